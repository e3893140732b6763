"""A scheduler replica hosted inside another process that submits jobs (an api replica).

Started by module name (``importlib``) from the host, as ``market`` starts every package: the host
does not call the scheduler's code, it keeps submitting on ``jobs.submit``, which the kernel
delivers to this replica in-process (``market.bus.serve_locally``) instead of through the NATS
server: on a busy machine that is two process wake-ups less on the way to a first token. The
replica is a full member of the schedulers' queue group for every other submitter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.service import SchedulerService

if TYPE_CHECKING:
    from nats.aio.client import Client

    from market.settings import Settings


async def start(settings: Settings, nc: Client) -> SchedulerService:
    """Start a replica on the host's connection, after its warm-up (``stop()`` undoes it)."""
    service = SchedulerService(settings, nc, name="scheduler-hosted", local=True)
    await service.start()
    return service
