"""The one run path: restore a clone for a profile, do work in it, destroy it.

`run` is what ``snapfleet run``, the daemon's local jobs, GitLab leases and
GitHub runners all go through. Its deadline covers restore and work (the
snapshot is resolved first: building an image is not the job's time); the
caller learns the VM is ready through ``on_ready`` and gets one `Report`
back. `exit_code` is the single mapping from an outcome to a process exit
code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from runner.agent.messages import Command as Command  # one value from the job to the guest
from runner.errors import AgentError, GpuError, GuestEnded, SnapfleetError
from runner.gpu.plug import GpuClaim, describe
from runner.service.jobs import JobState

if TYPE_CHECKING:
    from runner.config import Profile
    from runner.engine import Engine
    from runner.vm.backend import Machine, Session, TeardownReport

log = structlog.get_logger("snapfleet.job")

TIMEOUT_GRACE_S = 10.0
EXIT_TIMEOUT = 124
EXIT_SYSTEM = 125
EXIT_CANCELLED = 130

OutputSink = Callable[[str, bytes], Awaitable[None] | None]
Note = Callable[[str], None]


@dataclass(frozen=True)
class Restored:
    """How the job's VM was made."""

    vm_id: str
    snapshot: str
    warm: bool
    """It came from a pool (its setup and spawn, and if hot its restore, were paid
    before the job)."""
    hot: bool
    """It came from the hot pool: restored and answering before the job was queued."""
    restore_s: float
    timings: Mapping[str, float]
    gpus: tuple[str, ...] = ()
    """The devices (GPU unit ids) attached to it and seen by its guest."""


@dataclass
class Outcome:
    """How a job (or one command of it) ended, as the store, the forge and metrics see it."""

    state: JobState
    exit_code: int | None = None
    reason: str | None = None
    signal: int | None = None

    @property
    def metric(self) -> str:
        return {
            JobState.SUCCEEDED: "succeeded",
            JobState.FAILED: "failed",
            JobState.TIMED_OUT: "timed_out",
            JobState.CANCELLED: "cancelled",
        }.get(self.state, "system_failure")


@dataclass
class Report:
    """Everything `run` did: the outcome, the restore and the teardown."""

    outcome: Outcome
    restored: Restored | None = None
    teardown: TeardownReport | None = None
    duration_s: float = 0.0


def _gpu_claim(engine: Engine, profile: Profile, units: Sequence[str] | None
               ) -> GpuClaim | None:
    """The GPUs ``profile`` asks for, to take from the engine's allocator (None: none)."""
    request = profile.gpu_request()
    if request is None:
        return None
    if engine.gpus is None:
        raise GpuError(f"the profile asks for {request}, but this host hands out none"
                       " (set [gpu] devices)")
    return GpuClaim(engine.gpus, request, units=units,
                    hotplug_timeout_s=engine.settings.gpu.hotplug_timeout_s)


def exit_code(outcome: Outcome) -> int:
    """The process exit code for ``outcome`` (`snapfleet run`, the GitLab executor)."""
    if outcome.state is JobState.SUCCEEDED:
        return 0
    if outcome.state is JobState.FAILED and outcome.exit_code is not None:
        return outcome.exit_code
    if outcome.state is JobState.TIMED_OUT:
        return EXIT_TIMEOUT
    if outcome.state is JobState.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_SYSTEM


Work = Callable[["Machine", float], Awaitable[Outcome]]
"""What to do with a READY machine, given the seconds left: returns the outcome."""

OnReady = Callable[["Machine", Restored], Awaitable[None]]


def command_work(command: Command, sink: OutputSink, timeout_s: float) -> Work:
    """Work that runs one command, streaming its output to ``sink``."""

    async def work(machine: Machine, remaining: float) -> Outcome:
        return await execute(machine, command, sink, remaining, timeout_s=timeout_s)

    return work


async def execute(
    machine: Machine,
    command: Command,
    sink: OutputSink,
    remaining: float,
    *,
    timeout_s: float | None = None,
    cancel: asyncio.Event | None = None,
) -> Outcome:
    """Run ``command`` in a READY machine within ``remaining`` seconds.

    The agent enforces the limit (or the command's own ``timeout``, if
    shorter) in the guest; a backstop covers a hung guest.
    ``timeout_s`` is the limit to name when it is hit (the job's, not what was left).
    Setting ``cancel`` stops the command (SIGTERM to its process group, then SIGKILL).
    """
    named = timeout_s if timeout_s is not None else remaining
    watcher: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(remaining + TIMEOUT_GRACE_S):
            limit = remaining if command.timeout is None else min(command.timeout, remaining)
            session = await machine.exec(dataclasses.replace(command, timeout=limit))
            if cancel is not None:
                watcher = asyncio.create_task(_cancel_when(cancel, session))
            async for chunk in session:
                out = sink(chunk.stream, chunk.data)
                if out is not None:
                    await out
            status = await session.wait()
    except TimeoutError:
        return Outcome(JobState.TIMED_OUT, reason=f"timed out after {named:g}s")
    except AgentError as exc:
        raise await machine.died_error(exc) from exc
    finally:
        if watcher is not None:
            watcher.cancel()
    if status.timed_out:
        return Outcome(JobState.TIMED_OUT, reason=f"timed out after {named:g}s")
    if status.cancelled:
        return Outcome(JobState.CANCELLED, reason="cancelled")
    if status.signal:
        return Outcome(JobState.FAILED, exit_code=128 + status.signal, signal=status.signal,
                       reason=f"killed by signal {status.signal}")
    if status.exit_code == 0:
        return Outcome(JobState.SUCCEEDED, exit_code=0)
    return Outcome(JobState.FAILED, exit_code=status.exit_code,
                   reason=f"exited with code {status.exit_code}")


async def _cancel_when(cancel: asyncio.Event, session: Session) -> None:
    await cancel.wait()
    if not session.done:
        with contextlib.suppress(SnapfleetError):
            await session.cancel(signal.SIGTERM)


async def run(
    engine: Engine,
    profile: Profile,
    work: Work,
    *,
    timeout_s: float,
    note: Note,
    on_ready: OnReady | None = None,
    context: Mapping[str, object] | None = None,
    gpus: Sequence[str] | None = None,
) -> Report:
    """Restore a clone of ``profile``'s snapshot, do ``work`` in it, destroy it.

    ``timeout_s`` bounds restore and work together; ``note`` gets progress
    lines for the job's log; ``context`` is logged with "job finished".
    A GPU profile's devices (``gpus``: the scheduler's choice of units, else
    any free ones) are plugged in once the VM is up, or put on its command line
    in `coldboot` mode; the job starts once the guest shows them, and they are
    given back after the VM is destroyed.
    Failures become the report's outcome; CancelledError propagates after the
    VM is destroyed.
    """
    bound = log.bind(**(context or {}))
    report = Report(Outcome(JobState.SYSTEM_FAILURE, reason="did not finish"))
    machine: Machine | None = None
    claim: GpuClaim | None = None
    started = time.monotonic()
    try:
        claim = _gpu_claim(engine, profile, gpus)
        coldboot = claim is not None and profile.gpu_mode == "coldboot"
        if coldboot:
            image = await engine.image(profile, note)
            key = ""
        else:
            snapshot = await engine.snapshot(profile, note)
            key = snapshot.key
        started = time.monotonic()
        async with asyncio.timeout(timeout_s):
            if claim is not None:
                claim.start()  # taking the devices overlaps the restore
            if coldboot:
                assert claim is not None
                machine = await engine.boot(profile, image, devices=await claim.devices(),
                                            policy=engine.policy(profile))
            else:
                # The pool policy: a profile's own hot clones first, then its warm VMMs; a
                # profile without a pool of its own leaves other profiles' warm VMs alone.
                machine = await engine.restore(
                    snapshot, use_pool=profile.warm > 0,
                    hot_key=engine.hot_key(profile) if profile.hot > 0 else None,
                    policy=engine.policy(profile),
                )
            restore_s = time.monotonic() - started
            bound = bound.bind(vm_id=machine.vm_id)
            note(
                (f"booted {profile.image} cold" if coldboot
                 else f"restored {profile.image} from snapshot {key[:12]}")
                + f" in {restore_s * 1000:.0f} ms"
                + (" from the hot pool" if machine.hot
                   else " from the warm pool" if machine.pooled else "")
                + f" (vm {machine.vm_id})"
            )
            if claim is not None:
                verdict = await claim.attach(machine, plug=not coldboot)
                note(describe(verdict, claim.attach_s))
            report.restored = restored = Restored(
                vm_id=machine.vm_id,
                snapshot=key,
                warm=machine.pooled,
                hot=machine.hot,
                restore_s=restore_s,
                timings=dict(machine.timings),
                gpus=() if claim is None else claim.unit_ids,
            )
            if on_ready is not None:
                await on_ready(machine, restored)
            remaining = max(1.0, timeout_s - (time.monotonic() - started))
            report.outcome = await work(machine, remaining)
    except TimeoutError:
        report.outcome = Outcome(JobState.TIMED_OUT, reason=f"timed out after {timeout_s:g}s")
    except asyncio.CancelledError:
        report.outcome = Outcome(JobState.CANCELLED, reason="cancelled")
        raise
    except SnapfleetError as exc:
        if isinstance(exc, GuestEnded):
            note("the guest's last console lines:")
            for line in exc.console.splitlines():
                note(f"console: {line}")
        report.outcome = Outcome(JobState.SYSTEM_FAILURE, reason=str(exc))
    except Exception as exc:
        bound.exception("job crashed the executor")
        report.outcome = Outcome(JobState.SYSTEM_FAILURE, reason=f"internal error: {exc!r}")
    finally:
        if machine is not None:
            report.teardown = await machine.destroy()
            for problem in report.teardown.errors:
                bound.warning("teardown", problem=problem)
        if claim is not None:
            # After the VM: VFIO lets go of a device only once its QEMU has exited.
            sick = await asyncio.shield(claim.release())
            if sick:
                note(f"GPU(s) {', '.join(sick)} could not be reset and are quarantined")
        report.duration_s = time.monotonic() - started
        outcome, restored_ = report.outcome, report.restored
        bound.info(
            "job finished",
            outcome=str(outcome.state),
            exit_code=outcome.exit_code,
            reason=outcome.reason,
            restore_ms=None if restored_ is None else round(restored_.restore_s * 1000, 1),
            warm=restored_ is not None and restored_.warm,
            hot=restored_ is not None and restored_.hot,
            duration_s=round(report.duration_s, 3),
            teardown=None if report.teardown is None else report.teardown.escalation,
        )
    return report
