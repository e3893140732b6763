"""Running a service's event loop."""

from __future__ import annotations

import asyncio
import gc
from collections import deque
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


TIMED_OUT = object()
"""What ``Mailbox.get_within`` returns when nothing came in time."""


class Mailbox:
    """A stream's items: any number of writers, one reader at a time (the api's relay of a job
    attempt's chunks, the node agent's of its engine's emissions).

    A relay puts and takes an item per streamed token; ``asyncio.Queue`` does more per item (an
    unfinished-task count and its Event, a deque of getters, a running-loop lookup per wait).
    """

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None = None) -> None:
        """Until an item is put, or ``timeout`` seconds pass: a timer wakes the same waiter
        (``asyncio.wait_for`` would wrap the wait in a task of its own on Python 3.11, two more
        turns of a busy loop on the way to a request's first token)."""
        waiter = self._waiter = self._loop.create_future()
        timer = None if timeout is None else self._loop.call_later(max(0.0, timeout), wake, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    async def get(self) -> Any:
        """The next item; cancelling the wait loses none."""
        while not self._items:
            await self._wait()
        return self._items.popleft()

    async def get_within(self, timeout: float) -> Any:
        """The next item, or ``TIMED_OUT`` after ``timeout`` seconds; cancelling the wait loses none."""
        if not self._items:
            await self._wait(timeout)
        return self._items.popleft() if self._items else TIMED_OUT

    async def take(self) -> list[Any]:
        """Every item there is, waiting for the first if there is none."""
        while not self._items:
            await self._wait()
        return self._take_all()

    async def take_within(self, timeout: float) -> list[Any]:
        """Every item there is, waiting up to ``timeout`` seconds for the first (none if it does
        not come; no wait at all for a timeout <= 0)."""
        if not self._items and timeout > 0:
            await self._wait(timeout)
        return self._take_all()

    def _take_all(self) -> list[Any]:
        items = list(self._items)
        self._items.clear()
        return items


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
