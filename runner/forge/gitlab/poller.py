"""Asking GitLab for jobs: the long poll on ``/jobs/request``.

`JobPoller.next_job` long-polls until a job comes: it keeps GitLab's
``last_update`` cursor, backs off with jitter on failures (honouring
``Retry-After``), and never asks faster than ``check_interval_s`` when GitLab
answers "no job" at once. A job it cannot read is reported failed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import structlog

from runner.errors import ForgeAuthError, ForgeError, ForgeUnavailable, JobPayloadError
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.session import Backoff, Clock, JobOutcome, Sleep, TraceStream
from runner.secret import Secret

log = structlog.get_logger("snapfleet.gitlab")


class JobPoller:
    """Asks GitLab for jobs with one runner token until one comes."""

    def __init__(
        self,
        client: GitLabClient,
        token: Secret,
        *,
        system_id: str,
        check_interval_s: float = 3.0,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._token = token
        self._system_id = system_id
        self._check_interval = check_interval_s
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self.last_update: str | None = None
        self.requests = 0
        """Requests sent so far (for metrics and tests)."""
        self.refused: str | None = None
        """GitLab's refusal of the runner token, until it answers a request again."""

    async def next_job(self) -> JobPayload:
        """The next job for this runner. Call it only with capacity free for a job.

        Retries network failures, 429 and 5xx forever with backoff (the daemon
        stops it by cancelling). A malformed job is reported failed
        (``runner_system_failure``) and skipped; one that cannot even be failed
        (no job id) is backed off as a failure. Raises ``ForgeAuthError`` when
        GitLab rejects the runner token (the caller decides how long to wait).
        """
        failures = 0
        while True:
            started = self._clock()
            self.requests += 1
            try:
                answer = await self._client.request_job(
                    self._token, system_id=self._system_id, last_update=self.last_update
                )
            except JobPayloadError as exc:
                await self._reject(exc)
                if exc.job_id is None:
                    # Nothing to fail, so GitLab may hand the same unreadable answer
                    # again at once: pace it as a failure, not a busy loop.
                    failures += 1
                    await self._sleep(self._backoff.delay(failures, self._rng))
                continue
            except ForgeAuthError as exc:
                self.refused = str(exc)
                raise
            except ForgeError as exc:
                failures += 1
                delay = self._backoff.delay(failures, self._rng)
                if isinstance(exc, ForgeUnavailable) and exc.retry_after:
                    delay = max(delay, exc.retry_after)
                log.warning("gitlab job request failed; backing off", error=str(exc),
                            delay_s=round(delay, 2))
                await self._sleep(delay)
                continue
            failures = 0
            self.refused = None
            self.last_update = answer.last_update
            if answer.job is not None:
                return answer.job
            # A "no job" that came back at once (no long polling in front of
            # GitLab) must not turn into a busy loop.
            rest = self._check_interval - (self._clock() - started)
            if rest > 0:
                await self._sleep(rest)

    async def _reject(self, exc: JobPayloadError) -> None:
        log.error("gitlab sent a job we cannot read", error=str(exc), job_id=exc.job_id)
        if exc.job_id is None or not isinstance(exc.job_token, Secret):
            return
        stream = TraceStream(self._client, exc.job_id, exc.job_token, sleep=self._sleep,
                             clock=self._clock, rng=self._rng, max_finish_s=60.0)
        stream.write(f"\x1b[31;1mERROR: snapfleet cannot run this job: {exc}\x1b[0;m\n".encode())
        with contextlib.suppress(ForgeError):
            await stream.finish(JobOutcome.failed("runner_system_failure"))
