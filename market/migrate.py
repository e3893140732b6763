"""Run the Alembic migrations from code (``market migrate``, ``market up``, the test harness).

The migrations are the only way the schema changes. Areas may add their own branches off the
first revision, so we always upgrade to ``heads``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _in_thread(fn: Callable[[], None]) -> None:
    """Alembic's async env.py calls ``asyncio.run``; a thread keeps that legal under a running loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(fn).result()


def upgrade(database_url: str, target: str = "heads") -> None:
    _in_thread(lambda: command.upgrade(alembic_config(database_url), target))


def downgrade(database_url: str, target: str = "base") -> None:
    _in_thread(lambda: command.downgrade(alembic_config(database_url), target))
