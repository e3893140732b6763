"""Jobs waiting at a scheduler replica for a free slot: plain data, no I/O.

When every node serving a model is busy, a job that may wait (``Job.wait_s``) is kept here and
placed the moment a heartbeat reports a free slot, instead of the api asking again and again
(a poll with backoff adds up to its longest pause to every queued request, and serves them in no
particular order). Order: reserved before burst before on_demand, since reserved capacity is what
tenants pay for whether they use it or not; first come first served within a class.
"""

from __future__ import annotations

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
    timer: Any = None
    """The expiry timer, cancelled when the job leaves the queue another way."""


class WaitQueue:
    """Parked jobs per model and admission class, each class in arrival order (an insertion-ordered
    dict, so taking a job out anywhere in the queue is O(1))."""

    def __init__(self) -> None:
        self._by_model: dict[str, tuple[dict[str, Waiting], ...]] = {}
        self._models_of: dict[str, str] = {}
        """Job id -> model, to find a job's queue."""

    def __len__(self) -> int:
        return len(self._models_of)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._models_of

    def add(self, entry: Waiting) -> None:
        job = entry.job
        queues = self._by_model.get(job.model)
        if queues is None:
            queues = self._by_model[job.model] = tuple({} for _ in CLASS_ORDER)
        queues[_RANK.get(job.admission_class, len(CLASS_ORDER) - 1)][job.id] = entry
        self._models_of[job.id] = job.model

    def remove(self, job_id: str) -> Waiting | None:
        """Take a job out (placed, expired or withdrawn); None if it is not waiting here."""
        model = self._models_of.pop(job_id, None)
        if model is None:
            return None
        queues = self._by_model[model]
        entry = None
        for queue in queues:
            entry = queue.pop(job_id, None)
            if entry is not None:
                break
        if not any(queues):
            del self._by_model[model]
        return entry

    def has(self, model: str) -> bool:
        return model in self._by_model

    def ordered(self, model: str) -> Iterator[Waiting]:
        """The model's waiting jobs in the order they should be served. Nothing may be added or
        removed until the iteration is over (collect, then ``remove``)."""
        for queue in self._by_model.get(model, ()):
            yield from queue.values()

    def drain(self) -> list[Waiting]:
        """Every waiting job, removed (a replica stopping answers them all)."""
        entries = [entry for queues in self._by_model.values() for queue in queues for entry in queue.values()]
        self._by_model.clear()
        self._models_of.clear()
        return entries
