"""The provider agent installs and runs without the control plane's stack (``pip install '.[node]'``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_node_agent_imports_without_database_or_web_stack() -> None:
    """Import everything a provider machine runs with SQLAlchemy, Litestar and asyncpg made
    unimportable: a stray import of the control plane would fail here."""
    code = textwrap.dedent(
        """
        import sys
        for blocked in ("sqlalchemy", "litestar", "asyncpg", "alembic", "stripe", "api", "billing", "scheduler"):
            sys.modules[blocked] = None  # import raises ImportError
        import nodes.__main__, nodes.agent, nodes.enrol, nodes.profiles, nodes.engines.sim, nodes.engines.vllm
        from nodes.__main__ import build_parser
        build_parser().parse_args(["join", "--api", "http://x", "--token", "t", "--engine", "sim"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
