"""GitLab's runner API as a job source: the daemon takes GitLab jobs itself, no gitlab-runner.

One `GitLabSource` per ``[[gitlab.runners]]`` entry. It asks GitLab for a job
only while its profile has a free slot (`JobPort.free_slots`), so a job it
takes starts at once. A job payload carries no tags: GitLab hands a runner
only jobs whose tags are among the runner's, so the runner's tags choose the
profile, once, at start (the first profile whose labels include all of them;
none: the daemon refuses to start). A job GitLab could send is thus always
one a profile serves.

Each taken job becomes a daemon job whose `Work` (`runner.forge.gitlab.work`)
runs the whole GitLab job in its one VM, with the job's own timeout as the
daemon job's. The source owns the job's trace from the moment it is taken
until GitLab has the final state, whatever happens to the daemon job: a
``canceling`` from GitLab stops the running script, or cancels the daemon
job if it is still queued. The job token and masked variables live in memory
only (the agent writes the script 0600 and deletes it): never in the store, a
log line or argv; crash safety (`runner.forge.gitlab.inflight`) is the one
exception, documented there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from runner import __version__
from runner.errors import ConfigError, Draining, ForgeAuthError, ForgeError
from runner.forge.gitlab._race import unless_set
from runner.forge.gitlab.cache import ProjectCaches
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.config import GitLabRunnerConfig, default_system_id, read_runner_token
from runner.forge.gitlab.inflight import InflightBook, Orphan
from runner.forge.gitlab.layout import GuestLayout
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.poller import JobPoller
from runner.forge.gitlab.script import unsupported_reason
from runner.forge.gitlab.session import JobOutcome, TraceStream
from runner.forge.gitlab.timeouts import host_deadline_s
from runner.forge.gitlab.work import GuestRun, gitlab_outcome, red
from runner.limits import MAX_TIMEOUT_S
from runner.service.jobs import Job, JobSpec
from runner.service.scheduler import choose_profile

if TYPE_CHECKING:
    from runner.config import Settings
    from runner.service.port import JobPort

log = structlog.get_logger("snapfleet.gitlab")
T = TypeVar("T")

CANCEL_CHECK_S = 1.0
"""With no output to send, tell GitLab the job is alive this often, and so hear a cancel
(``Job-Status: canceling``) within about a second plus GitLab's update interval."""
CAPACITY_CHECK_S = 1.0
"""Without a job ending to wake it, look at free capacity this often."""
AUTH_RETRY_S = 60.0
"""After GitLab refused the runner token (401/403), ask again after about this long
(jittered ±25 %): a token can come back (a GitLab restore, a transient auth outage), as
gitlab-runner retries an unhealthy runner; a deleted runner needs re-registering."""
ORPHAN_FINISH_S = 120.0
ORPHAN_ATTEMPTS = 5
"""Starts at which an interrupted job's final state is tried before its record is dropped
(GitLab then fails the job at its timeout): a record must not be retried forever."""
SHUTDOWN_FINISH_S = 10.0
"""Once the daemon stops, how long a final update may still be retried; after that the
journal keeps the job's outcome and the next start reports it."""


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


class JournaledTrace(TraceStream):
    """A trace that also appends what it keeps (masked) to the job's in-flight journal."""

    journal_fd: int | None = None

    def write(self, data: bytes) -> None:
        before = self.buffer.size
        super().write(data)
        self._journal(before)

    def _close(self) -> None:
        before = self.buffer.size
        super()._close()
        self._journal(before)  # the masker's held-back tail, or a replay would lack it

    def _journal(self, before: int) -> None:
        if self.journal_fd is not None and self.buffer.size > before:
            try:
                os.write(self.journal_fd, self.buffer.tail(before))
            except OSError as exc:
                # The job goes on; only a crash report would lack the rest of its trace.
                log.warning("gitlab trace journal cannot be written", error=str(exc),
                            gitlab_job=self.job_id)
                self.journal_fd = None


class Claim:
    """One slot of a profile held by a GitLab source: while it polls, then until the job
    it got is queued in the daemon (from then on `JobPort.free_slots` counts it)."""

    def __init__(self, slots: SlotClaims, profile: str) -> None:
        self._slots = slots
        self._profile = profile
        self._held = True

    def release(self) -> None:
        """Give the slot back (again: nothing)."""
        if self._held:
            self._held = False
            self._slots.held[self._profile] -= 1


class SlotClaims:
    """The slots all GitLab sources of one daemon hold, per profile.

    A long poll may hand a job any time in its ~50 s, so a source claims its slot
    before it asks: two runners on one profile never ask for the same free slot.
    The composition root makes one and gives it to every `GitLabSource`.
    """

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def claim(self, profile: str, free: int) -> Claim | None:
        """A slot of ``profile`` if ``free`` (the daemon's free slots) leaves one."""
        held = self.held.get(profile, 0)
        if free - held <= 0:
            return None
        self.held[profile] = held + 1
        return Claim(self, profile)


class GitLabSource:
    """One registered GitLab runner served by the daemon (a `JobSource`)."""

    requeue_on_restart = False  # the job's work (and its token) lived in the old process

    def __init__(self, config: GitLabRunnerConfig, port: JobPort, *,
                 claims: SlotClaims | None = None, auth_retry_s: float = AUTH_RETRY_S,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.claims = claims or SlotClaims()
        self.auth_retry_s = auth_retry_s
        self._rng = rng or random.Random()
        self.port = port
        self.name = f"gitlab-{config.runner_id}"
        self.profile = runner_profile(port.settings, config)
        # On tmpfs (paths.runtime_dir): the journal holds job tokens, which never reach disk.
        self.book = InflightBook(
            port.settings.paths.runtime_dir / "gitlab" / f"runner-{config.runner_id}")
        self.layout = GuestLayout(builds_dir=config.builds_dir)
        # Per project job caches (`runner.forge.gitlab.cache`): in this instance's state
        # dir, not the image cache, which several instances (and their jobs) share.
        self.cache_root = (
            port.settings.paths.state_dir / "gitlab" / "caches" / f"runner-{config.runner_id}")
        self.running: dict[int, str | None] = {}
        """GitLab job id → daemon job id (None until submitted)."""
        self.poller: JobPoller | None = None
        self._ended: dict[str, asyncio.Future[Job]] = {}
        self._wake = asyncio.Event()
        port.subscribe(self._job_ended)

    @property
    def unhealthy(self) -> str | None:
        """Why GitLab refuses to hand this runner jobs now (None: polling normally)."""
        if self.poller is None or self.poller.refused is None:
            return None
        return f"GitLab refused the runner token: {self.poller.refused}"

    def status(self) -> dict[str, Any]:
        return {self.name: {
            "url": self.config.url, "profile": self.profile, "tags": list(self.config.tags),
            "running": {str(k): v for k, v in self.running.items()},
            "requests": 0 if self.poller is None else self.poller.requests,
            "healthy": self.unhealthy is None, "unhealthy": self.unhealthy,
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

    def _claim(self) -> Claim | None:
        return self.claims.claim(self.profile, self.port.free_slots(self.profile))

    async def _until_stopping(self, aw: Awaitable[T]) -> T | None:
        """``aw``'s result, or None (``aw`` cancelled) once the daemon begins to stop."""
        return (await unless_set(self.port.stopping, aw))[1]

    async def _poll(self, client: GitLabClient, poller: JobPoller,
                    group: asyncio.TaskGroup) -> None:
        while not self.port.stopping.is_set():
            while (claim := self._claim()) is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), CAPACITY_CHECK_S)
                if self.port.stopping.is_set():
                    return
            job: JobPayload | None = None
            try:
                job = await self._until_stopping(poller.next_job())
            except ForgeAuthError as exc:
                delay = self.auth_retry_s * self._rng.uniform(0.75, 1.25)
                log.error("gitlab runner token refused; asking again later (re-register the"
                          " runner if it was deleted or its token rotated)",
                          runner=self.config.runner_id, error=str(exc),
                          retry_in_s=round(delay, 1), forge="gitlab")
                claim.release()
                await self._until_stopping(asyncio.sleep(delay))
                continue
            finally:
                if job is None:
                    claim.release()
            if job is None:
                return
            self.running[job.id] = None
            group.create_task(self._handle(client, job, claim), name=f"gitlab-job-{job.id}")

    async def _handle(self, client: GitLabClient, job: JobPayload, claim: Claim) -> None:
        bound = log.bind(gitlab_job=job.id, runner=self.config.runner_id, forge="gitlab")
        trace = JournaledTrace.for_job(client, job, force_send_interval_s=CANCEL_CHECK_S)
        try:
            async with trace:
                final = await self._journaled_run(client, job, trace, bound, claim)
                await self._finish(trace, final)
            bound.info("gitlab job reported", state=final.state, reason=final.failure_reason,
                       exit_code=final.exit_code)
        except TimeoutError:
            bound.warning("gitlab did not take the final update before shutdown; the next"
                          " start reports it")
        except ForgeError as exc:
            bound.error("gitlab job could not be reported", error=str(exc))
        except Exception:
            bound.exception("gitlab job handling failed")
        finally:
            claim.release()
            if trace.journal_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(trace.journal_fd)
                trace.journal_fd = None
            self.running.pop(job.id, None)
            self._wake.set()
            if trace.finished is not None:
                await self._forget(job.id, bound)

    async def _journaled_run(self, client: GitLabClient, job: JobPayload,
                             trace: JournaledTrace, bound: Any, claim: Claim) -> JobOutcome:
        """Journal the job, run it, journal how it ended; a journal that cannot be
        written fails this job only (a disk error must not stop the daemon)."""
        try:
            trace.journal_fd = await asyncio.to_thread(self.book.take, job.id, job.token)
        except OSError as exc:
            bound.error("gitlab job cannot be journaled; failing it", error=str(exc),
                        journal=str(self.book.root))
            trace.write(red(f"ERROR: the runner cannot record this job on its disk ({exc});"
                            " it is not run"))
            return JobOutcome.failed("runner_system_failure")
        final = await self._run(client, job, trace, claim)
        try:
            await asyncio.to_thread(self.book.conclude, job.id, job.token, final)
        except OSError as exc:  # GitLab is told now; only a crash report would lack it
            bound.warning("gitlab job outcome cannot be journaled", error=str(exc))
        return final

    async def _forget(self, job_id: int, bound: Any) -> None:
        try:
            await asyncio.to_thread(self.book.done, job_id)
        except OSError as exc:  # the next start finds GitLab done with it (403) and drops it
            bound.warning("gitlab job journal cannot be removed", error=str(exc))

    async def _finish(self, trace: TraceStream, final: JobOutcome) -> None:
        """``trace.finish``, retried as long as GitLab needs, but for no more than
        `SHUTDOWN_FINISH_S` once the daemon stops (TimeoutError then)."""
        finishing = asyncio.ensure_future(trace.finish(final))
        stop = asyncio.ensure_future(self.port.stopping.wait())
        try:
            await asyncio.wait([finishing, stop], return_when=asyncio.FIRST_COMPLETED)
            if not finishing.done():
                await asyncio.wait_for(asyncio.shield(finishing), SHUTDOWN_FINISH_S)
        finally:
            stop.cancel()
            if not finishing.done():
                finishing.cancel()
                await asyncio.wait([finishing])
        finishing.result()

    async def _run(self, client: GitLabClient, job: JobPayload, trace: TraceStream,
                   claim: Claim) -> JobOutcome:
        trace.write(f"Running with snapfleet {__version__} on runner {self.config.runner_id}"
                    f" (profile {self.profile})\n".encode())
        if (why := unsupported_reason(job)) is not None:
            trace.write(red(f"ERROR: {why}"))
            return JobOutcome.failed("configuration_error")
        trace.write(b"Preparing a microVM from its snapshot...\n")
        caches = ProjectCaches(self.cache_root, job.job_info.project_id)
        run = GuestRun(client, job, trace, self.layout, self.port, caches)
        name = f"gitlab {job.job_info.name or 'job'} #{job.id}"[:200]
        spec = JobSpec(script=f"# GitLab job {job.id} (run by the gitlab source)", name=name,
                       profile=self.profile,
                       timeout_s=min(float(host_deadline_s(job)), MAX_TIMEOUT_S))
        try:
            daemon_job = await self.port.submit(spec, source=self.name, work=run.work)
        except (ConfigError, Draining) as exc:
            trace.write(red(f"ERROR: the runner could not start this job: {exc}"))
            return JobOutcome.failed("runner_system_failure")
        finally:
            claim.release()  # queued now: the daemon's free slots count it
        if (why := self.port.waiting(daemon_job.id)) is not None:
            # Another source took the slot meanwhile: the job's GitLab timeout runs on.
            trace.write(f"Snapfleet: queued for a {self.profile} VM: {why}\n".encode())
        run.daemon_job_id = daemon_job.id
        self.running[job.id] = daemon_job.id
        ended: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._ended[daemon_job.id] = ended
        watcher = asyncio.create_task(self._cancel_while_queued(trace, run, daemon_job.id))
        try:
            record = await ended
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])  # ours; a cancel of this task still propagates
        final = gitlab_outcome(run, record)
        if run.result is None and record.reason:
            trace.write(red(f"ERROR: {record.state}: {record.reason}"))
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
        try:
            orphans = await asyncio.to_thread(self.book.orphans)
        except OSError as exc:
            log.error("gitlab in-flight journal cannot be read; jobs a crash interrupted are"
                      " left to GitLab's timeout", journal=str(self.book.root), error=str(exc),
                      forge="gitlab")
            return
        for orphan in orphans:
            trace = TraceStream(client, orphan.job_id, orphan.token,
                                max_finish_s=ORPHAN_FINISH_S)
            trace.write(orphan.trace)
            trace.known_to_gitlab = trace.buffer.size  # what follows, GitLab never had
            outcome = orphan.outcome
            if outcome is None:
                trace.write(b"\n" + red("ERROR: the runner stopped while this job ran (the"
                                         " daemon restarted); it is not run again"))
                outcome = JobOutcome.failed("runner_system_failure")
            try:
                await trace.finish(outcome)
            except ForgeError as exc:
                await self._orphan_not_reported(orphan, trace, exc)
                continue
            log.info("interrupted gitlab job reported failed", gitlab_job=orphan.job_id,
                     forge="gitlab")
            await self._forget(orphan.job_id, log.bind(gitlab_job=orphan.job_id, forge="gitlab"))

    async def _orphan_not_reported(self, orphan: Orphan, trace: TraceStream,
                                   exc: ForgeError) -> None:
        """Keep the record for the next start, `ORPHAN_ATTEMPTS` starts at most; drop it
        at once when GitLab holds trace the journal lacks (no start could match it)."""
        bound = log.bind(gitlab_job=orphan.job_id, forge="gitlab", error=str(exc))
        attempts = orphan.attempts + 1
        if trace.remote_ahead is None and attempts < ORPHAN_ATTEMPTS:
            try:
                await asyncio.to_thread(self.book.attempted, orphan, attempts)
            except OSError as write_error:
                bound.warning("gitlab in-flight journal cannot be updated",
                              write_error=str(write_error))
            bound.warning("could not report an interrupted gitlab job; will retry at the"
                          " next start", attempt=attempts, of=ORPHAN_ATTEMPTS)
            return
        bound.error("giving up on reporting an interrupted gitlab job; GitLab fails it at"
                    " its timeout", attempts=attempts)
        await self._forget(orphan.job_id, bound)
