"""Jobs waiting at a scheduler replica for a free slot: plain data, no I/O.

When every node serving a model is busy, a job that may wait (``Job.wait_s``) is kept here and
placed the moment a heartbeat reports a free slot, instead of the api asking again and again
(a poll with backoff adds up to its longest pause to every queued request, and serves them in no
particular order). Order: reserved before burst before on_demand, since reserved capacity is what
tenants pay for whether they use it or not; first come first served within a class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from market.wire import AdmissionClass, Job

CLASS_ORDER: tuple[AdmissionClass, ...] = ("reserved", "burst", "on_demand")
_RANK = {name: rank for rank, name in enumerate(CLASS_ORDER)}


@dataclass(eq=False, slots=True)
class Waiting:
    """One parked job: the job, its bytes as submitted (forwarded as they are), and whom to answer."""

    job: Job
    data: bytes
    reply: Any
    """What the service answers through (the NATS request message)."""
    deadline: float
    """Monotonic time after which the job is answered ``no_capacity``."""
    timer: Any = None
    """The expiry timer, cancelled when the job leaves the queue another way."""
    gone: bool = False
    """Left the queue (placed, expired or withdrawn); skipped where it still sits in a deque."""


class WaitQueue:
    """Parked jobs per model and admission class. Removal by id is O(1): entries are marked gone
    and dropped when iteration reaches them."""

    def __init__(self) -> None:
        self._by_model: dict[str, tuple[deque[Waiting], ...]] = {}
        self._by_id: dict[str, Waiting] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._by_id

    def add(self, entry: Waiting) -> None:
        queues = self._by_model.get(entry.job.model)
        if queues is None:
            queues = self._by_model[entry.job.model] = tuple(deque() for _ in CLASS_ORDER)
        queues[_RANK.get(entry.job.admission_class, len(CLASS_ORDER) - 1)].append(entry)
        self._by_id[entry.job.id] = entry

    def remove(self, job_id: str) -> Waiting | None:
        """Take a job out (placed, expired or withdrawn); None if it is not waiting here."""
        entry = self._by_id.pop(job_id, None)
        if entry is not None:
            entry.gone = True
        return entry

    def has(self, model: str) -> bool:
        queues = self._by_model.get(model)
        if queues is None:
            return False
        for queue in queues:
            while queue and queue[0].gone:
                queue.popleft()
            if queue:
                return True
        del self._by_model[model]
        return False

    def ordered(self, model: str) -> Iterator[Waiting]:
        """The model's waiting jobs in the order they should be served. The caller may ``remove``
        entries as it goes, but must not ``add`` before it is done (no awaits in between)."""
        for queue in self._by_model.get(model, ()):
            while queue and queue[0].gone:
                queue.popleft()
            for entry in queue:
                if not entry.gone:
                    yield entry

    def drain(self) -> list[Waiting]:
        """Every waiting job, removed (a replica stopping answers them all)."""
        entries = list(self._by_id.values())
        for entry in entries:
            entry.gone = True
        self._by_id.clear()
        self._by_model.clear()
        return entries
