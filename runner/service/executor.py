"""Running one scheduled job: restore a clone, run the job, record how it ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from runner.config import Profile
from runner.engine import Command, Engine, OutputSink, RunResult
from runner.errors import GuestEnded, SnapfleetError
from runner.service.jobs import Job, JobState
from runner.service.logs import JobLog
from runner.service.store import Store

if TYPE_CHECKING:
    from runner.vm.qemu import QemuMachine

log = structlog.get_logger("snapfleet.job")


@dataclass
class Outcome:
    """How a job ended, as the store and the forge see it."""

    state: JobState
    exit_code: int | None = None
    reason: str | None = None
    restore_s: float | None = None
    warm: bool = False
    snapshot: str | None = None

    @property
    def metric(self) -> str:
        return {
            JobState.SUCCEEDED: "succeeded",
            JobState.FAILED: "failed",
            JobState.TIMED_OUT: "timed_out",
            JobState.CANCELLED: "cancelled",
        }.get(self.state, "system_failure")


def outcome_of(result: RunResult, timeout_s: float) -> Outcome:
    """Map a finished command to a job outcome."""
    if result.timed_out:
        return Outcome(JobState.TIMED_OUT, reason=f"timed out after {timeout_s:g}s")
    if result.cancelled:
        return Outcome(JobState.CANCELLED, reason="cancelled")
    if result.signal:
        return Outcome(JobState.FAILED, exit_code=128 + result.signal,
                       reason=f"killed by signal {result.signal}")
    if result.exit_code == 0:
        return Outcome(JobState.SUCCEEDED, exit_code=0)
    return Outcome(JobState.FAILED, exit_code=result.exit_code,
                   reason=f"exited with code {result.exit_code}")


Work = Callable[["QemuMachine", float], Awaitable[Outcome]]
"""What to do with a READY machine, given the seconds left: returns the outcome."""


def script_work(job: Job, job_log: JobLog, engine: Engine, timeout: float) -> Work:
    """Run the job's script or command, streaming its output into the job log."""

    async def work(machine: QemuMachine, remaining: float) -> Outcome:
        spec = job.spec
        command = Command(argv=spec.command, script=spec.script, env=job.environment(),
                          cwd=spec.workdir)
        result = RunResult(vm_id=machine.vm_id, exit_code=None)
        await engine.execute(machine, command, _sink(job_log), remaining, result)
        return outcome_of(result, timeout)

    return work


async def run_in_vm(
    job: Job,
    profile: Profile,
    engine: Engine,
    store: Store,
    job_log: JobLog,
    work: Work | None = None,
) -> Outcome:
    """Restore a VM for ``job``, do ``work`` in it (default: run its script), destroy it.

    The wall-clock timeout covers restore and work. CancelledError propagates.
    """
    timeout = job.spec.timeout_s or profile.timeout_s
    work = work or script_work(job, job_log, engine, timeout)
    bound = log.bind(job_id=job.id, forge=job.source, profile=job.profile)
    machine = None
    started = time.monotonic()
    outcome = Outcome(JobState.SYSTEM_FAILURE, reason="did not finish")
    try:
        async with asyncio.timeout(timeout):
            snapshot = await engine.snapshot(profile, job_log.note)
            restore_started = time.monotonic()
            # A profile without a pool of its own leaves other profiles' warm VMs alone.
            machine = await engine.restore(
                snapshot, use_pool=profile.warm > 0, policy=engine.policy(profile)
            )
            outcome.restore_s = time.monotonic() - restore_started
            outcome.warm = machine.timings.get("pool") == 1.0
            outcome.snapshot = snapshot.key
            bound = bound.bind(vm_id=machine.vm_id)
            await store.lease(machine.vm_id, job.id, machine.pid)
            await store.transition(job, JobState.RUNNING, vm_id=machine.vm_id)
            job_log.note(
                f"restored {job.profile} from snapshot {snapshot.key[:12]} in "
                f"{outcome.restore_s * 1000:.0f} ms (vm {machine.vm_id})"
            )
            remaining = max(1.0, timeout - (time.monotonic() - started))
            outcome = _with_restore(await work(machine, remaining), outcome)
    except TimeoutError:
        outcome = _with_restore(
            Outcome(JobState.TIMED_OUT, reason=f"timed out after {timeout:g}s"), outcome
        )
    except asyncio.CancelledError:
        outcome = Outcome(JobState.CANCELLED, reason=job.reason or "cancelled")
        raise
    except SnapfleetError as exc:
        if isinstance(exc, GuestEnded):
            job_log.note("the guest's last console lines:")
            for line in exc.console.splitlines():
                job_log.note(f"console: {line}")
        outcome = _with_restore(Outcome(JobState.SYSTEM_FAILURE, reason=str(exc)), outcome)
    except Exception as exc:
        bound.exception("job crashed the executor")
        outcome = Outcome(JobState.SYSTEM_FAILURE, reason=f"internal error: {exc!r}")
    finally:
        if machine is not None:
            report = await machine.destroy()
            for problem in report.errors:
                bound.warning("teardown", problem=problem)
            await store.release(machine.vm_id)
        job_log.note(f"job {outcome.state}" + (f": {outcome.reason}" if outcome.reason else ""))
        bound.info(
            "job finished",
            outcome=str(outcome.state),
            exit_code=outcome.exit_code,
            reason=outcome.reason,
            restore_ms=None if outcome.restore_s is None else round(outcome.restore_s * 1000, 1),
            warm=outcome.warm,
            duration_s=round(time.monotonic() - started, 3),
        )
    return outcome


def _with_restore(new: Outcome, old: Outcome) -> Outcome:
    new.restore_s, new.warm, new.snapshot = old.restore_s, old.warm, old.snapshot
    return new


def _sink(job_log: JobLog) -> OutputSink:
    def write(_stream: str, data: bytes) -> None:
        job_log.write(data)

    return write
