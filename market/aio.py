"""Running a service's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (not on Windows), else on asyncio's own loop.

    The relay path is mostly small socket writes and task wake-ups, which uvloop does with less
    CPU than asyncio's own loop; the api gets it from uvicorn, the agent and the scheduler here.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
