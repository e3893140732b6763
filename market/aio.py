"""Running a service's event loop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (not on Windows), else on asyncio's own loop.

    The relay path is mostly small socket writes and task wake-ups, which uvloop does with less
    CPU than asyncio's own loop; the api gets it from uvicorn, the agent and the scheduler here.
    The heap built so far is settled first (``settle_heap``).
    """
    settle_heap()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def wake(future: asyncio.Future[Any]) -> None:
    """Resolve a bare wake-up future unless something already did (a timer's callback)."""
    if not future.done():
        future.set_result(None)


class Drainers:
    """At most ``limit`` tasks each running ``work``: a loop that takes a shared queue's items in
    batches until the queue is empty (group commit). Queue an item, then ``kick()``.

    A task counts as running until its coroutine has returned, not until its done-callbacks have
    run: a count kept by such a callback lags a loop iteration behind, and an item queued in that
    moment waited for the next item to come along and start a task, for ever if none came (a
    request's last usage store or admission; seen as streams that never ended).
    """

    def __init__(self, limit: int, work: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self.limit = limit
        self._work = work
        self._name = name
        self._tasks: list[asyncio.Task[None]] = []

    def kick(self) -> None:
        """Start a task unless ``limit`` are running (one running will take the new item)."""
        self._tasks = [task for task in self._tasks if not task.done()]
        if len(self._tasks) < self.limit:
            self._tasks.append(asyncio.create_task(self._work(), name=self._name))

    async def wait(self) -> None:
        """Until every task has drained the queue and stopped (those started meanwhile too)."""
        while running := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(running)


def settle_heap(young_threshold: int = 50_000) -> None:
    """Move everything built so far out of the cyclic collector's reach and collect the young less often.

    A relayed token allocates a handful of short-lived containers (a NATS message, its decoded
    chunk, a future), which refcounting frees; at CPython's default gen0 threshold of 700 the
    collector still ran every few hundred tokens and, every hundredth run, walked the whole heap
    of imported modules and the built app (about a tenth of the api's CPU under streaming load).
    Frozen objects are never collected (they live as long as the process anyway); cycles made
    later are still found, a little later.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
