"""One job's conversation with GitLab: its trace streamed, its end reported.

`TraceStream` owns one job's trace: the runner
writes output into it, a background task sends it in patches every
``X-GitLab-Trace-Update-Interval``, resyncing on 416, and sets
`TraceStream.cancel_requested` / `TraceStream.aborted` when GitLab says the
job is being cancelled or is gone. `TraceStream.finish` sends the rest of the
trace and the final ``PUT /jobs/:id``, retrying until GitLab accepts it.

`JobOutcome` is how a job ended, in GitLab's terms; `Backoff` is the retry
pacing every loop around the runner API shares (`runner.forge.gitlab.poller`,
`runner.forge.gitlab.transfer`). Clock, sleep and RNG are injectable, for
tests that count requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import structlog

from runner.errors import ForgeError, ForgeUnavailable
from runner.forge.gitlab.client import GitLabClient, JobUpdate, RemoteState
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.trace import (
    DEFAULT_LIMIT,
    Masker,
    TraceBuffer,
    TraceResyncError,
    section_end,
    section_start,
)
from runner.secret import Secret

log = structlog.get_logger("snapfleet.gitlab")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

ALWAYS_SUPPORTED_REASONS = ("script_failure", "runner_system_failure", "job_execution_timeout")
_COMPATIBLE_REASON = {
    "image_pull_failure": "runner_system_failure",
    "configuration_error": "script_failure",
}
MAX_UPDATE_INTERVAL_S = 60.0
"""Cap on GitLab's suggested trace interval, so a cancel is still seen within a minute."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter" (half fixed, half random), capped."""

    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` ≥ 1)."""
        cap = min(self.max_s, self.base_s * 2.0 ** (attempt - 1))
        return cap / 2 + rng.uniform(0, cap / 2)


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended, as the final ``PUT /jobs/:id`` reports it."""

    state: str
    failure_reason: str | None = None
    exit_code: int | None = None

    @classmethod
    def success(cls) -> JobOutcome:
        """Every step that had to pass passed."""
        return cls("success")

    @classmethod
    def failed(cls, reason: str, exit_code: int | None = None) -> JobOutcome:
        """Failed with one of GitLab's failure reasons (mapped if GitLab lacks it)."""
        return cls("failed", reason, exit_code)


def supported_failure_reason(reason: str, accepted: Iterable[str]) -> str:
    """``reason`` if this GitLab knows it, else its older equivalent, else ``unknown_failure``.

    GitLab lists the reasons it accepts (``accepted``) in the job's
    ``features.failure_reasons``; the three in `ALWAYS_SUPPORTED_REASONS` every
    version accepts (gitlab-runner's rule).
    """
    known = set(accepted) | set(ALWAYS_SUPPORTED_REASONS)
    if reason in known:
        return reason
    compatible = _COMPATIBLE_REASON.get(reason)
    if compatible in known:
        return compatible
    return "unknown_failure"


class TraceStream:
    """One job's trace on its way to GitLab, and GitLab's word on the job.

    Use as ``async with TraceStream.for_job(client, job) as trace:``; the
    background sender runs inside the block. Call `finish` before leaving it;
    leaving it without (an exception, a cancel) reports the job failed with
    ``runner_system_failure`` on the way out.
    """

    def __init__(
        self,
        client: GitLabClient,
        job_id: int,
        job_token: Secret,
        *,
        masker: Masker | None = None,
        failure_reasons: Sequence[str] = (),
        limit: int = DEFAULT_LIMIT,
        update_interval_s: float = 3.0,
        force_send_interval_s: float = 30.0,
        max_finish_s: float = 900.0,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.job_id = job_id
        self._client = client
        self._token = job_token
        self.buffer = TraceBuffer(masker, limit=limit)
        self._failure_reasons = tuple(failure_reasons)
        self.interval = update_interval_s
        self._force_send = force_send_interval_s
        self._max_finish = max_finish_s
        self._backoff = backoff or Backoff(base_s=1.0, max_s=30.0)
        self._sleep = sleep
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self.cancel_requested = asyncio.Event()
        """GitLab asks for the job to be cancelled (``Job-Status: canceling``)."""
        self.aborted = asyncio.Event()
        """The job is over on GitLab's side (canceled, failed, deleted): stop now."""
        self.finished: RemoteState | None = None
        self.known_to_gitlab: int | None = None
        """At most how many of this trace's bytes GitLab can hold (a replay: the journal's
        length, as lines were added after it); None: all that was produced."""
        self.remote_ahead: int | None = None
        """Set when GitLab holds more trace bytes than `known_to_gitlab` (a replay from a
        journal that lost its tail): they cannot be matched, so nothing more is sent."""
        self._task: asyncio.Task[None] | None = None
        self._last_contact = clock()
        self._failures = 0
        self._first = asyncio.Event()
        self._soon = asyncio.Event()
        self.requests = 0

    @classmethod
    def for_job(cls, client: GitLabClient, job: JobPayload, **kw: Any) -> Self:
        """A stream for ``job`` whose masker hides its masked variables and tokens."""
        masker = Masker(job.masked_values(), job.features.token_mask_prefixes)
        return cls(
            client, job.id, job.token, masker=masker,
            failure_reasons=job.features.failure_reasons, **kw,
        )

    async def __aenter__(self) -> TraceStream:
        self._task = asyncio.create_task(self._run(), name=f"gitlab-trace-{self.job_id}")
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.finished is None and not self.buffer.closed:
            # The job died with us: GitLab must not wait for it until its timeout. (Once
            # `finish` ran, the outcome is known: a failed finish is its caller's to handle.)
            self.write(b"\n\x1b[31;1mERROR: the runner stopped this job unexpectedly\x1b[0;m\n")
            with contextlib.suppress(ForgeError, TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(self.finish(JobOutcome.failed("runner_system_failure"))),
                    timeout=min(self._max_finish, 30.0),
                )
        await self._stop_sender()

    # -- writing ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Append job output (masked before it is kept or sent).

        The first bytes go out at once (a user watching the job sees it start);
        later ones on GitLab's update interval.
        """
        if not self.buffer.closed:
            self.buffer.write(data)
            if self.buffer.size:
                self._first.set()

    def send_soon(self) -> None:
        """Send what is pending now rather than at the next interval (once: e.g. when the
        job's own output begins, so a user watching sees it start at once)."""
        self._soon.set()

    def section_start(self, name: str, header: str = "") -> None:
        """Open a collapsible section of the job log (host-side steps)."""
        self.write(section_start(name, int(self._wall()), header))

    def section_end(self, name: str) -> None:
        """Close section ``name``."""
        self.write(section_end(name, int(self._wall())))

    # -- sending ------------------------------------------------------------

    async def _run(self) -> None:
        # Not wait_for: on 3.11 it can swallow a cancel that races the event.
        first = asyncio.ensure_future(self._first.wait())
        try:
            await asyncio.wait([first], timeout=self.interval)
        finally:
            first.cancel()
        while True:
            try:
                await self._send_pending()
                if self._clock() - self._last_contact >= self._force_send:
                    await self._touch()
                self._failures = 0
            except (ForgeError, TraceResyncError) as exc:
                # Whatever GitLab says short of "the job is gone" (403/404, or a
                # Job-Status of canceled/failed: `_note`) must not stop a running job:
                # keep the bytes and send them again later (from 0 when GitLab's size is
                # unknown; its 416 then says where it stands).
                self._failures += 1
                log.warning("gitlab trace update failed; will retry", job_id=self.job_id,
                            error=str(exc))
                if isinstance(exc, TraceResyncError):
                    self.buffer.rewind()
                await self._sleep(self._backoff.delay(self._failures, self._rng))
            if self.aborted.is_set():
                return
            await self._pause()

    async def _pause(self) -> None:
        """Wait GitLab's update interval, or less if `send_soon` was called."""
        if not self._soon.is_set():
            soon = asyncio.ensure_future(self._soon.wait())
            nap = asyncio.ensure_future(self._sleep(self.interval))
            try:
                await asyncio.wait([soon, nap], return_when=asyncio.FIRST_COMPLETED)
            finally:
                soon.cancel()
                nap.cancel()
        self._soon.clear()

    async def _send_pending(self) -> None:
        """Send patches until GitLab has the whole trace so far (or says stop)."""
        while (patch := self.buffer.next_patch()) is not None:
            self.requests += 1
            answer = await self._client.patch_trace(self.job_id, self._token, patch)
            self._note(answer)
            if answer.status == 202:
                self.buffer.acknowledge(patch)
            elif answer.status == 416:
                if answer.remote_size is None:
                    raise TraceResyncError("GitLab answered 416 without a Range")
                known = self.buffer.size if self.known_to_gitlab is None else self.known_to_gitlab
                if answer.remote_size > known:
                    self.remote_ahead = answer.remote_size
                    raise TraceResyncError(
                        f"GitLab holds {answer.remote_size} trace bytes, we know of {known}")
                self.buffer.resync(answer.remote_size)
            if self.aborted.is_set():
                return

    async def _touch(self) -> None:
        """No trace for a while: tell GitLab the job is alive, and hear if it is cancelled."""
        self.requests += 1
        answer = await self._client.update_job(
            self.job_id, self._token,
            JobUpdate("running", self.buffer.checksum, self.buffer.size),
        )
        self._note(answer)

    def _note(self, answer: RemoteState) -> None:
        self._last_contact = self._clock()
        if answer.update_interval:
            self.interval = min(answer.update_interval, MAX_UPDATE_INTERVAL_S)
        if answer.cancel_requested:
            self.cancel_requested.set()
        if answer.aborted:
            self.aborted.set()

    async def _stop_sender(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # asyncio.wait: our own caller's cancel still reaches us; the task's does not.
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.error("gitlab trace sender failed", job_id=self.job_id,
                          error=repr(task.exception()))

    def _close(self) -> None:
        """No more output: the masker's held-back tail joins the trace."""
        self.buffer.close()

    async def _send_trace_for_finish(self) -> None:
        """`_send_pending`, where a refusal that is not "try later" is retried as one."""
        try:
            await self._send_pending()
        except ForgeUnavailable:
            raise
        except ForgeError as exc:
            raise ForgeUnavailable(str(exc), forge="gitlab", status=exc.status) from exc

    async def finish(self, outcome: JobOutcome) -> RemoteState:
        """Send the rest of the trace, then the final state, until GitLab accepts it.

        202 ("accepted, not yet done") and failures are retried every interval
        (backing off on failures) for up to ``max_finish_s``; 412 resends the
        whole trace. When GitLab holds more trace than this stream
        (`remote_ahead`), nothing more is sent and the final state goes out
        as is; a 412 then raises ``ForgeError`` at once (it cannot be matched).
        Returns GitLab's last answer; raises ``ForgeUnavailable`` when it never
        accepted in time.
        """
        await self._stop_sender()
        self._close()
        reason = outcome.failure_reason
        if reason:
            reason = supported_failure_reason(reason, self._failure_reasons)
        deadline = self._clock() + self._max_finish
        failures = 0
        while True:
            try:
                if not self.aborted.is_set() and self.remote_ahead is None:
                    await self._send_trace_for_finish()
                self.requests += 1
                answer = await self._client.update_job(
                    self.job_id, self._token,
                    JobUpdate(outcome.state, self.buffer.checksum, self.buffer.size,
                              reason, outcome.exit_code),
                )
                self._note(answer)
                if answer.status in (200, 403, 404) or answer.aborted:
                    self.finished = answer
                    return answer
                if answer.status == 412:
                    if self.remote_ahead is not None:
                        raise ForgeError(
                            f"job {self.job_id}: GitLab holds {self.remote_ahead} trace bytes,"
                            f" this runner only {self.buffer.size}: its final state cannot"
                            " match GitLab's trace checksum", forge="gitlab", status=412)
                    self.buffer.rewind()
                delay = self.interval
            except ForgeUnavailable as exc:
                failures += 1
                delay = self._backoff.delay(failures, self._rng)
                if self._clock() + delay > deadline:
                    raise ForgeUnavailable(
                        f"job {self.job_id}: final update not accepted: {exc}",
                        forge="gitlab", status=exc.status,
                    ) from exc
            except TraceResyncError:
                if self.remote_ahead is None:
                    self.buffer.rewind()
                delay = self.interval
            if self._clock() + delay > deadline:
                raise ForgeUnavailable(
                    f"job {self.job_id}: final update not accepted in {self._max_finish:.0f} s",
                    forge="gitlab",
                )
            await self._sleep(delay)
