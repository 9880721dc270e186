"""Leases: a VM held for an outside driver across several of its processes.

gitlab-runner's custom executor calls `prepare`, then `run` once per stage,
then `cleanup`, each a separate process; the VM lives in the daemon between
them. A lease is a job (so it queues, counts against capacity, times out and
is recovered like any other) whose work is to keep its VM until released.

Each stage runs through the lease's job: its start and end are in the job's
log and history (its output goes only to the driver: GitLab masks the trace,
a copy here would hold what secrets the job printed), it is bounded by what
is left of the job's timeout, and its result is recorded. The first stage
that fails (other than ``after_script``, which GitLab never lets fail a job)
decides the job's outcome, so a failed build is counted as failed, not as a
released lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from runner.errors import ConfigError, SnapfleetError, VMError
from runner.execution import Command, Outcome, OutputSink, execute
from runner.service.jobs import Job, JobSpec, JobState
from runner.service.port import JobPort
from runner.vm.backend import Machine

if TYPE_CHECKING:
    from runner.forge.gitlab_helper import ImageCheck

log = structlog.get_logger("snapfleet.leases")

_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SOURCE = "gitlab"
STAGE_MARGIN_S = 1.0
NEVER_FAILS_JOB = frozenset({"after_script"})
"""Stages whose failure GitLab records but never lets fail the job."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ConfigError("key", "lease keys are 1-128 characters of [A-Za-z0-9_.:-]")
    return key


@dataclass
class Lease:
    """One held VM, found again by its key (e.g. GitLab runner id + job id)."""

    key: str
    ready: asyncio.Future[None]
    job: Job | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # its job has ended
    machine: Machine | None = None
    deadline: float = 0.0  # monotonic: the job's timeout runs out
    timeout_s: float = 0.0
    failure: Outcome | None = None  # the first stage that failed the job
    ended: str | None = None  # why the lease ended before it was released

    async def hold(self, machine: Machine, remaining: float) -> Outcome:
        """The job's work: announce the VM, then hold it until released."""
        self.machine = machine
        self.timeout_s = remaining
        self.deadline = time.monotonic() + remaining
        if not self.ready.done():
            self.ready.set_result(None)
        await self.released.wait()
        return self.failure or Outcome(JobState.SUCCEEDED, reason="released")

    def describe(self) -> dict[str, object]:
        machine = self.machine
        return {
            "key": self.key,
            "job_id": None if self.job is None else self.job.id,
            "profile": None if self.job is None else self.job.profile,
            "vm_id": None if machine is None else machine.vm_id,
            "snapshot": None if machine is None else machine.prepared_for,
            "restore_ms": None if machine is None else
            round(machine.timings.get("total", 0.0) * 1000, 1),
            "warm": machine is not None and machine.pooled,
            "ended": self.ended,
        }


class LeaseBook:
    """The job source of GitLab's custom executor: leases by key and by job. New ones
    are made under one lock so two prepares for one key never make two VMs."""

    name = SOURCE
    requeue_on_restart = False  # the driver's processes went with the old daemon

    def __init__(
        self,
        port: JobPort,
        *,
        allowed_profiles: list[str],
        default_profile: str,
        shell: str = "/bin/sh",
        check_image: Callable[[str], ImageCheck] | None = None,
    ) -> None:
        self._port = port
        self.shell = shell  # what stage scripts run under
        self._allowed = allowed_profiles
        self._default = default_profile
        # Profile name -> its image and what it lacks (blocking: reads the recipe).
        self._check_image = check_image
        self.by_key: dict[str, Lease] = {}
        self.by_job: dict[str, Lease] = {}
        self._lock = asyncio.Lock()
        port.subscribe(self._job_ended)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        yield  # requests arrive through the local API

    def status(self) -> dict[str, Any]:
        return {"leases": sorted(self.by_key)}

    async def acquire(self, key: str, profile: str | None, timeout_s: float | None = None,
                      *, wait_s: float | None = None) -> Lease:
        """The lease for ``key`` (made and queued if new), once its VM is ready; or, with
        ``wait_s``, after that many seconds at most (then ``lease.ready`` is not done and
        the caller asks again with the same key)."""
        check_key(key)
        async with self._lock:
            lease = self.by_key.get(key)
            if lease is None:
                lease = await self._new(key, profile, timeout_s)
        if wait_s is None:
            await asyncio.shield(lease.ready)
        else:
            await asyncio.wait([lease.ready], timeout=wait_s)
            if lease.ready.done():
                lease.ready.result()  # raises why there is no VM
        return lease

    async def check(self, profile: str | None) -> dict[str, Any]:
        """What stops a job of ``profile`` (or the default one) from running here:
        ``{"profile", "image", "problems": [one line each]}``. Asks for no VM."""
        name = profile or self._default
        problems = []
        if name not in self._allowed:
            problems.append(self._not_allowed(name))
        image = None
        if self._check_image is not None:
            found = await asyncio.to_thread(self._check_image, name)
            image = found.image
            if found.problem is not None:
                problems.append(found.problem)
        return {"profile": name, "image": image, "problems": problems}

    def waiting(self, lease: Lease) -> str:
        """What a lease whose VM is not ready yet waits for, in words."""
        if lease.job is None:
            return "being queued"
        return self._port.waiting(lease.job.id) or "restoring its VM"

    async def release(self, key: str) -> bool:
        """Destroy the VM held under ``key``; False if there was none. Idempotent."""
        lease = self.by_key.pop(key, None)
        if lease is None:
            return False
        lease.released.set()
        if lease.job is not None:
            if lease.job.state is JobState.QUEUED:
                await self._port.cancel(lease.job.id)  # it never gets a VM
            await lease.finished.wait()  # set once its VM is destroyed
        return True

    async def exec(
        self,
        key: str,
        command: Command,
        sink: OutputSink,
        *,
        stage: str,
        cancel: asyncio.Event | None = None,
    ) -> Outcome:
        """Run one stage in the VM held under ``key``: recorded in the job, bounded by the
        job's timeout, recorded. LookupError if no VM is held, VMError if it is gone."""
        lease = self.by_key.get(key)
        if lease is None or lease.job is None:
            raise LookupError(f"no VM is held for {key}")
        machine, job = lease.machine, lease.job
        if lease.ended is not None or machine is None or lease.released.is_set():
            raise VMError(f"the VM held for {key} is gone: {lease.ended or 'released'}")
        # A second less than the job has left, so the stage's own timeout (and its
        # report to the driver) comes before the job's ends the VM under it.
        remaining = lease.deadline - time.monotonic() - STAGE_MARGIN_S
        sent = 0

        async def tee(stream: str, data: bytes) -> None:
            # The output goes to gitlab-runner only: GitLab masks its trace, and a copy
            # on this host would hold whatever secrets the job printed.
            nonlocal sent
            sent += len(data)
            out = sink(stream, data)
            if out is not None:
                await out

        await self._port.annotate(job.id, f"stage {stage}: started")
        if remaining <= 0:
            outcome = Outcome(JobState.TIMED_OUT, reason=f"timed out after {lease.timeout_s:g}s")
        else:
            try:
                outcome = await execute(machine, command, tee, remaining,
                                        timeout_s=lease.timeout_s, cancel=cancel)
            except SnapfleetError as exc:  # the VM died under the stage
                outcome = Outcome(JobState.SYSTEM_FAILURE, reason=str(exc))
        await self._port.annotate(
            job.id, f"stage {stage}: {_describe(outcome)} ({sent} bytes of output to the driver)"
        )
        self._record(lease, stage, outcome)
        return outcome

    def _record(self, lease: Lease, stage: str, outcome: Outcome) -> None:
        if outcome.state is JobState.SUCCEEDED or lease.failure is not None:
            return
        if stage in NEVER_FAILS_JOB and outcome.state is not JobState.SYSTEM_FAILURE:
            return
        lease.failure = Outcome(
            outcome.state, exit_code=outcome.exit_code, signal=outcome.signal,
            reason=f"stage {stage}: {_describe(outcome)}",
        )
        if outcome.state is JobState.SYSTEM_FAILURE:
            lease.released.set()  # nothing more can run in it: end the job, free the VM

    async def _new(self, key: str, profile: str | None, timeout_s: float | None) -> Lease:
        name = profile or self._default
        if name not in self._allowed:
            raise ConfigError("SNAPFLEET_PROFILE", self._not_allowed(name))
        lease = Lease(key, asyncio.get_running_loop().create_future())
        spec = JobSpec(command=["gitlab-executor"], name=key, profile=name, timeout_s=timeout_s)
        lease.job = await self._port.submit(spec, source=SOURCE, work=lease.hold)
        self.by_key[key] = lease
        self.by_job[lease.job.id] = lease
        return lease

    def _not_allowed(self, name: str) -> str:
        return f"profile {name!r} is not allowed for GitLab jobs (allowed: {self._allowed})"

    def _job_ended(self, job: Job) -> None:
        """The lease's job is over: waiters for its VM learn why (idempotent)."""
        lease = self.by_job.pop(job.id, None)
        if lease is None:
            return
        lease.finished.set()
        if not lease.released.is_set():
            lease.ended = job.reason or str(job.state)
        if not lease.ready.done():
            why = lease.ended or job.reason or str(job.state)
            lease.ready.set_exception(VMError(f"no VM for {lease.key}: {why}"))
            lease.ready.exception()  # retrieved here; waiters re-raise it


def _describe(outcome: Outcome) -> str:
    if outcome.state is JobState.FAILED and outcome.exit_code is not None:
        return f"failed, exit code {outcome.exit_code}"
    return str(outcome.state) + (f" ({outcome.reason})" if outcome.reason else "")
