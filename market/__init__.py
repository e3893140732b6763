"""The marketplace's shared kernel: settings, wire messages, subjects, ids, money, database and CLI.

Import cost matters here: the node agent imports this package without SQLAlchemy or Litestar
installed, so nothing heavy is imported at package level.
"""

__version__ = "0.1.0"
