"""GitLab's runner API as a job source: the daemon takes GitLab jobs itself, no gitlab-runner.

One `GitLabSource` per ``[[gitlab.runners]]`` entry. It asks GitLab for a job
only while its profile has a free slot (`JobPort.free_slots`), so a job it
takes starts at once. A job payload carries no tags: GitLab hands a runner
only jobs whose tags are among the runner's, so the runner's tags choose the
profile, once, at start (the first profile whose labels include all of them;
none: the daemon refuses to start). A job GitLab could send is thus always
one a profile serves.

Each taken job becomes a daemon job whose `Work` runs the whole GitLab job in
its one VM: dependencies downloaded on the host and put in the guest, the
script of `runner.forge.gitlab.script` run by bash (per-step timeouts inside
it, the job's own timeout as the daemon job's), output masked and streamed
to GitLab's trace, artifacts read back and uploaded. A ``canceling`` from
GitLab SIGTERMs the script's process group; a job still queued is cancelled
in the daemon. The job token and masked variables live in that closure only
(the agent writes the script 0600 and deletes it): never in the store, a log
line or argv. Crash safety is `runner.forge.gitlab.inflight`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from runner import __version__
from runner.errors import (
    ConfigError,
    Draining,
    ForgeAuthError,
    ForgeError,
    ForgeUnavailable,
)
from runner.execution import Command, Outcome, execute
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.config import GitLabRunnerConfig, default_system_id, read_runner_token
from runner.forge.gitlab.inflight import InflightBook
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.script import (
    GuestLayout,
    ResultReader,
    build_script,
    dependency_files,
    outcome,
    unsupported_reason,
)
from runner.forge.gitlab.session import (
    JobOutcome,
    JobPoller,
    TraceStream,
    download_dependencies,
    upload_artifact,
)
from runner.forge.gitlab.trace import Masker
from runner.limits import MAX_TIMEOUT_S
from runner.service.jobs import Job, JobSpec, JobState
from runner.service.scheduler import choose_profile

if TYPE_CHECKING:
    from runner.config import Settings
    from runner.service.port import JobPort
    from runner.vm.backend import Machine

log = structlog.get_logger("snapfleet.gitlab")
T = TypeVar("T")

CANCEL_CHECK_S = 1.0
"""With no output to send, tell GitLab the job is alive this often, and so hear a cancel
(``Job-Status: canceling``) within about a second plus GitLab's update interval."""
CAPACITY_CHECK_S = 1.0
"""Without a job ending to wake it, look at free capacity this often."""
ORPHAN_FINISH_S = 120.0
BASH = "/bin/bash"
"""The job script is bash (what GitLab's ``shell`` for this executor says)."""


def runner_profile(settings: Settings, config: GitLabRunnerConfig) -> str:
    """The profile serving every job ``config``'s runner can be sent; ConfigError if none."""
    try:
        return choose_profile(settings, None, config.tags)
    except ConfigError:
        raise ConfigError(
            "gitlab.runners",
            f"runner {config.runner_id}: no profile's labels include all of its tags"
            f" {sorted(config.tags)}: add them to one profile's labels (or register a"
            " runner per profile)",
        ) from None


def _red(text: str) -> bytes:
    return f"\x1b[31;1m{text}\x1b[0;m\n".encode()


class JournaledTrace(TraceStream):
    """A trace that also appends what it keeps (masked) to the job's in-flight journal."""

    journal_fd: int | None = None

    def write(self, data: bytes) -> None:
        before = self.buffer.size
        super().write(data)
        if self.journal_fd is not None and self.buffer.size > before:
            try:
                os.write(self.journal_fd, self.buffer.tail(before))
            except OSError as exc:
                # The job goes on; only a crash report would lack the rest of its trace.
                log.warning("gitlab trace journal cannot be written", error=str(exc),
                            gitlab_job=self.job_id)
                self.journal_fd = None


class GuestRun:
    """One GitLab job's `Work`: everything done in its VM, and how it ended for GitLab."""

    def __init__(self, client: GitLabClient, job: JobPayload, trace: TraceStream,
                 layout: GuestLayout, port: JobPort) -> None:
        self.client = client
        self.job = job
        self.trace = trace
        self.layout = layout
        self.port = port
        self.daemon_job_id: str | None = None
        self.started = False
        self.result: JobOutcome | None = None
        self._log_masker = Masker(job.masked_values(), job.features.token_mask_prefixes)

    def _gone(self) -> bool:
        return self.trace.cancel_requested.is_set() or self.trace.aborted.is_set()

    def _log(self, data: bytes) -> None:
        job_log = self.port.job_log(self.daemon_job_id or "")
        if job_log is not None:
            job_log.write(data)

    def output(self, data: bytes) -> None:
        """Job output: to GitLab's trace and the daemon's job log, both masked."""
        self.trace.write(data)
        self._log(self._log_masker.feed(data))

    async def work(self, machine: Machine, remaining: float) -> Outcome:
        """Run the job in ``machine`` (the daemon's `Work`)."""
        self.started = True
        if self._gone():
            self.result = JobOutcome.failed("job_canceled")
            return Outcome(JobState.CANCELLED, reason="cancelled in GitLab")
        started = time.monotonic()
        self.output(f"Running in microVM {machine.vm_id}\n".encode())
        try:
            await self._put_dependencies(machine)
        except ForgeError as exc:
            self.output(_red(f"ERROR: downloading dependencies failed: {exc}"))
            self.result = JobOutcome.failed(
                "runner_system_failure" if isinstance(exc, ForgeUnavailable)
                else "missing_dependency_failure")
            return Outcome(JobState.FAILED, reason=f"dependencies: {exc}")
        reader = ResultReader()

        first = True

        def sink(stream: str, data: bytes) -> None:
            nonlocal first
            if stream == "stderr":
                data = reader.feed(data)
            if data:
                self.output(data)
                if first:
                    first = False
                    self.trace.send_soon()

        cancel = asyncio.Event()
        watcher = asyncio.create_task(self._watch_cancel(cancel))
        try:
            left = max(1.0, remaining - (time.monotonic() - started))
            command = Command(script=build_script(self.job, self.layout), shell=BASH,
                              env={"HOME": "/root"})
            done = await execute(machine, command, sink, left,
                                 timeout_s=float(self.job.timeout_s), cancel=cancel)
        finally:
            watcher.cancel()
        cancelled = done.state is JobState.CANCELLED or cancel.is_set()
        final = outcome(reader.result, timed_out=done.state is JobState.TIMED_OUT,
                        cancelled=cancelled)
        if reader.result is not None and not cancelled and not self.trace.aborted.is_set():
            await self._upload(machine, reader.result.artifacts)
        self._log(self._log_masker.flush())
        self.result = final
        return _daemon_outcome(final)

    async def _watch_cancel(self, cancel: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.trace.cancel_requested.wait()),
                 asyncio.ensure_future(self.trace.aborted.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self.output(_red("ERROR: Job was canceled in GitLab; stopping it"))
        cancel.set()

    async def _put_dependencies(self, machine: Machine) -> None:
        if not any(d.artifacts_file and d.artifacts_file.filename for d in self.job.dependencies):
            return
        with tempfile.TemporaryDirectory(prefix="snapfleet-gitlab-") as tmp:
            saved = await download_dependencies(self.client, self.job, self.trace, Path(tmp))
            archives = [(dep.id, path.read_bytes()) for dep, path in saved]
        for guest_path, data in dependency_files(self.layout, archives):
            await machine.put_file(guest_path, data, 0o600)

    async def _upload(self, machine: Machine, indexes: tuple[int, ...]) -> None:
        for index in indexes:
            if index >= len(self.job.artifacts):
                continue
            data = await _read_file(machine, self.layout.artifact_path(index))
            if data is None:
                self.output(_red(f"ERROR: the artifacts archive {index} could not be read"))
                continue
            await upload_artifact(self.client, self.job, self.trace, self.job.artifacts[index],
                                  data)


async def _read_file(machine: Machine, path: str) -> bytes | None:
    """A file's bytes from the guest (``cat``), or None when it cannot be read."""
    session = await machine.exec(Command(argv=["cat", "--", path], timeout=120))
    parts = [chunk.data async for chunk in session if chunk.stream == "stdout"]
    status = await session.wait()
    return b"".join(parts) if status.exit_code == 0 else None


def _daemon_outcome(final: JobOutcome) -> Outcome:
    """The daemon's record of a job GitLab sees as ``final``."""
    if final.state == "success":
        return Outcome(JobState.SUCCEEDED, exit_code=0)
    reason = final.failure_reason or "unknown_failure"
    if reason == "job_canceled":
        return Outcome(JobState.CANCELLED, reason="cancelled in GitLab")
    if reason == "job_execution_timeout":
        return Outcome(JobState.TIMED_OUT, exit_code=final.exit_code, reason=reason)
    if reason == "runner_system_failure":
        return Outcome(JobState.SYSTEM_FAILURE, reason="the job script reported no result")
    code = f", exit code {final.exit_code}" if final.exit_code is not None else ""
    return Outcome(JobState.FAILED, exit_code=final.exit_code, reason=reason + code)


def gitlab_outcome(run: GuestRun, ended: Job) -> JobOutcome:
    """How GitLab hears of a job: the VM work's verdict, else what the daemon recorded."""
    if run.result is not None:
        return run.result
    if ended.state is JobState.CANCELLED and (run.trace.cancel_requested.is_set()
                                              or run.trace.aborted.is_set()):
        return JobOutcome.failed("job_canceled")
    if ended.state is JobState.TIMED_OUT:
        return JobOutcome.failed("job_execution_timeout")
    return JobOutcome.failed("runner_system_failure")


class GitLabSource:
    """One registered GitLab runner served by the daemon (a `JobSource`)."""

    requeue_on_restart = False  # the job's work (and its token) lived in the old process

    def __init__(self, config: GitLabRunnerConfig, port: JobPort) -> None:
        self.config = config
        self.port = port
        self.name = f"gitlab-{config.runner_id}"
        self.profile = runner_profile(port.settings, config)
        self.book = InflightBook(
            port.settings.paths.state_dir / "gitlab" / f"runner-{config.runner_id}")
        self.layout = GuestLayout(builds_dir=config.builds_dir)
        self.running: dict[int, str | None] = {}
        """GitLab job id → daemon job id (None until submitted)."""
        self.poller: JobPoller | None = None
        self.stopped_reason: str | None = None
        self._ended: dict[str, asyncio.Future[Job]] = {}
        self._wake = asyncio.Event()
        port.subscribe(self._job_ended)

    def status(self) -> dict[str, Any]:
        return {self.name: {
            "url": self.config.url, "profile": self.profile, "tags": list(self.config.tags),
            "running": {str(k): v for k, v in self.running.items()},
            "requests": 0 if self.poller is None else self.poller.requests,
            "stopped": self.stopped_reason,
        }}

    def _job_ended(self, job: Job) -> None:
        future = self._ended.pop(job.id, None)
        if future is not None and not future.done():
            future.set_result(job)
        if job.source == self.name:
            self._wake.set()

    def open(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._open()

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        token = read_runner_token(self.config.token_file)  # a bad file stops the start
        async with GitLabClient(self.config.url) as client, asyncio.TaskGroup() as group:
            self.poller = JobPoller(client, token, system_id=default_system_id(),
                                    check_interval_s=self.config.check_interval_s)
            group.create_task(self._report_orphans(client), name=f"{self.name}-orphans")
            polling = group.create_task(self._poll(client, self.poller, group),
                                        name=f"{self.name}-poll")
            log.info("gitlab runner serving", runner=self.config.runner_id, url=self.config.url,
                     profile=self.profile, forge="gitlab")
            try:
                yield
            finally:
                polling.cancel()

    # -- taking jobs -----------------------------------------------------------

    def _room(self) -> bool:
        starting = sum(1 for v in self.running.values() if v is None)
        return self.port.free_slots(self.profile) - starting > 0

    async def _until_stopping(self, aw: Awaitable[T]) -> T | None:
        """``aw``'s result, or None (``aw`` cancelled) once the daemon begins to stop."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self.port.stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        return None if task.cancelled() else task.result()

    async def _poll(self, client: GitLabClient, poller: JobPoller,
                    group: asyncio.TaskGroup) -> None:
        while not self.port.stopping.is_set():
            while not self._room():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), CAPACITY_CHECK_S)
                if self.port.stopping.is_set():
                    return
            try:
                job = await self._until_stopping(poller.next_job())
            except ForgeAuthError as exc:
                self.stopped_reason = f"GitLab refused the runner token: {exc}"
                log.error("gitlab runner token refused; not polling (re-register it)",
                          runner=self.config.runner_id, error=str(exc), forge="gitlab")
                return
            if job is None:
                return
            self.running[job.id] = None
            group.create_task(self._handle(client, job), name=f"gitlab-job-{job.id}")

    async def _handle(self, client: GitLabClient, job: JobPayload) -> None:
        bound = log.bind(gitlab_job=job.id, runner=self.config.runner_id, forge="gitlab")
        fd = self.book.take(job.id, job.token)
        trace = JournaledTrace.for_job(client, job, force_send_interval_s=CANCEL_CHECK_S)
        trace.journal_fd = fd
        try:
            async with trace:
                final = await self._run(client, job, trace)
                await trace.finish(final)
            bound.info("gitlab job reported", state=final.state, reason=final.failure_reason,
                       exit_code=final.exit_code)
        except ForgeError as exc:
            bound.error("gitlab job could not be reported", error=str(exc))
        except Exception:
            bound.exception("gitlab job handling failed")
        finally:
            os.close(fd)
            trace.journal_fd = None
            self.running.pop(job.id, None)
            self._wake.set()
            if trace.finished is not None:
                self.book.done(job.id)

    async def _run(self, client: GitLabClient, job: JobPayload, trace: TraceStream
                   ) -> JobOutcome:
        trace.write(f"Running with snapfleet {__version__} on runner {self.config.runner_id}"
                    f" (profile {self.profile})\n".encode())
        if (why := unsupported_reason(job)) is not None:
            trace.write(_red(f"ERROR: {why}"))
            return JobOutcome.failed("configuration_error")
        trace.write(b"Preparing a microVM from its snapshot...\n")
        run = GuestRun(client, job, trace, self.layout, self.port)
        name = f"gitlab {job.job_info.name or 'job'} #{job.id}"[:200]
        spec = JobSpec(script=f"# GitLab job {job.id} (run by the gitlab source)", name=name,
                       profile=self.profile,
                       timeout_s=min(max(float(job.timeout_s), 1.0), MAX_TIMEOUT_S))
        try:
            daemon_job = await self.port.submit(spec, source=self.name, work=run.work)
        except (ConfigError, Draining) as exc:
            trace.write(_red(f"ERROR: the runner could not start this job: {exc}"))
            return JobOutcome.failed("runner_system_failure")
        run.daemon_job_id = daemon_job.id
        self.running[job.id] = daemon_job.id
        ended: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._ended[daemon_job.id] = ended
        watcher = asyncio.create_task(self._cancel_while_queued(trace, run, daemon_job.id))
        try:
            record = await ended
        finally:
            watcher.cancel()
        final = gitlab_outcome(run, record)
        if run.result is None and record.reason:
            trace.write(_red(f"ERROR: {record.state}: {record.reason}"))
        return final

    async def _cancel_while_queued(self, trace: TraceStream, run: GuestRun, job_id: str) -> None:
        waits = [asyncio.ensure_future(trace.cancel_requested.wait()),
                 asyncio.ensure_future(trace.aborted.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not run.started:  # once it runs, its work stops the script itself
            with contextlib.suppress(KeyError):
                await self.port.cancel(job_id)

    # -- after a crash ------------------------------------------------------------

    async def _report_orphans(self, client: GitLabClient) -> None:
        """Fail the jobs a previous run took and never reported (never run them again)."""
        for orphan in self.book.orphans():
            trace = TraceStream(client, orphan.job_id, orphan.token,
                                max_finish_s=ORPHAN_FINISH_S)
            trace.write(orphan.trace)
            trace.write(b"\n" + _red("ERROR: the runner stopped while this job ran (the daemon"
                                     " restarted); it is not run again"))
            try:
                await trace.finish(JobOutcome.failed("runner_system_failure"))
            except ForgeError as exc:
                log.warning("could not report an interrupted gitlab job; will retry at the"
                            " next start", gitlab_job=orphan.job_id, error=str(exc),
                            forge="gitlab")
                continue
            log.info("interrupted gitlab job reported failed", gitlab_job=orphan.job_id,
                     forge="gitlab")
            self.book.done(orphan.job_id)
