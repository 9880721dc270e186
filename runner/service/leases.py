"""Leases: a VM held for an outside driver across several of its processes.

gitlab-runner's custom executor calls `prepare`, then `run` once per stage,
then `cleanup`, each a separate process; the VM lives in the daemon between
them. A lease is a job (so it queues, counts against capacity, times out and
is recovered like any other) whose work is to keep its VM until released.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runner.errors import ConfigError, VMError
from runner.service.executor import Outcome, Work
from runner.service.jobs import Job, JobSpec, JobState

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


class LeaseBook:
    """A daemon's leases, by key and by job; new ones are made under one lock so two
    prepares for one key never make two VMs."""

    def __init__(
        self,
        submit: Callable[[JobSpec], Awaitable[Job]],
        *,
        allowed_profiles: list[str],
        default_profile: str,
    ) -> None:
        self._submit = submit
        self._allowed = allowed_profiles
        self._default = default_profile
        self.by_key: dict[str, Lease] = {}
        self.by_job: dict[str, Lease] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, key: str, profile: str | None) -> Lease:
        """The lease for ``key`` (made and queued if new), once its VM is ready."""
        check_key(key)
        async with self._lock:
            lease = self.by_key.get(key)
            if lease is None:
                lease = await self._new(key, profile)
        await asyncio.shield(lease.ready)
        return lease

    async def _new(self, key: str, profile: str | None) -> Lease:
        name = profile or self._default
        if name not in self._allowed:
            raise ConfigError(
                "SNAPFLEET_PROFILE",
                f"profile {name!r} is not allowed for GitLab jobs (allowed: {self._allowed})",
            )
        job = await self._submit(JobSpec(command=["gitlab-executor"], name=key, profile=name))
        lease = Lease(key, job, asyncio.get_running_loop().create_future())
        self.by_key[key] = lease
        self.by_job[job.id] = lease
        return lease

    def end(self, job_id: str, outcome: Outcome) -> None:
        """The lease's job is over: waiters for its VM learn why (idempotent)."""
        lease = self.by_job.pop(job_id, None)
        if lease is None:
            return
        if not lease.released.is_set():
            lease.ended = outcome.reason or str(outcome.state)
        if not lease.ready.done():
            why = lease.ended or outcome.reason or str(outcome.state)
            lease.ready.set_exception(VMError(f"no VM for {lease.key}: {why}"))
            lease.ready.exception()  # retrieved here; waiters re-raise it
