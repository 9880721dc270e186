"""Leases: a VM held for an outside driver across several of its processes.

gitlab-runner's custom executor calls `prepare`, then `run` once per stage,
then `cleanup`, each a separate process; the VM lives in the daemon between
them. A lease is a job (so it queues, counts against capacity, times out and
is recovered like any other) whose work is to keep its VM until released.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.errors import ConfigError
from runner.service.executor import Outcome, Work
from runner.service.jobs import Job, JobState

if TYPE_CHECKING:
    from runner.vm.qemu import QemuMachine

_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ConfigError("key", "lease keys are 1-128 characters of [A-Za-z0-9_.:-]")
    return key


@dataclass
class Lease:
    """One held VM, found again by its key (e.g. GitLab runner id + job id)."""

    key: str
    job: Job
    ready: asyncio.Future[None]
    released: asyncio.Event = field(default_factory=asyncio.Event)
    machine: QemuMachine | None = None
    ended: str | None = None  # why the lease ended before it was released

    def work(self) -> Work:
        """The job's work: announce the VM, then hold it until released."""

        async def hold(machine: QemuMachine, _remaining: float) -> Outcome:
            self.machine = machine
            if not self.ready.done():
                self.ready.set_result(None)
            await self.released.wait()
            return Outcome(JobState.SUCCEEDED, reason="released")

        return hold

    def describe(self) -> dict[str, object]:
        machine = self.machine
        return {
            "key": self.key,
            "job_id": self.job.id,
            "profile": self.job.profile,
            "vm_id": None if machine is None else machine.vm_id,
            "snapshot": None if machine is None else machine.prepared_for,
            "restore_ms": None if machine is None else
            round(machine.timings.get("total", 0.0) * 1000, 1),
            "warm": machine is not None and machine.timings.get("pool") == 1.0,
            "ended": self.ended,
        }
