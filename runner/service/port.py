"""The job-source seam: what a source of jobs may ask of the daemon, and what it is.

A `JobSource` (the local API, GitLab leases, GitHub webhooks, the GitLab job
API...) turns a forge's or a user's requests into jobs through a `JobPort`,
and hears back through the events it subscribes to. The daemon implements
the port and knows no source by name; the composition root (`runner.compose`)
makes the sources and hands them to the daemon. Adding a source means a
module under ``runner/forge/`` and a config section, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from runner.config import Settings
    from runner.execution import Work
    from runner.secret import Secret
    from runner.service.jobs import Job, JobSpec
    from runner.service.logs import JobLog

JobListener = Callable[["Job"], None]
"""Told when a job of this daemon ends (after its outcome is recorded)."""


class JobPort(Protocol):
    """The daemon, as job sources see it."""

    settings: Settings
    stopping: asyncio.Event
    """Set when shutdown begins: from then on a source starts nothing new."""

    async def submit(
        self,
        spec: JobSpec,
        *,
        source: str,
        secret_env: Mapping[str, Secret] | None = None,
        work: Work | None = None,
    ) -> Job:
        """Queue a job. ``work`` replaces running the spec's script (a lease holds its
        VM); ConfigError when no profile can run it, Draining when shutting down."""
        ...

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job; KeyError if unknown."""
        ...

    async def annotate(self, job_id: str, note: str) -> None:
        """Record a note in a running job's log and history."""
        ...

    def subscribe(self, listener: JobListener) -> None:
        """Call ``listener`` with each job that ends."""
        ...

    def free_slots(self, profile: str) -> int:
        """How many more jobs of ``profile`` this host could start now, after the queued
        ones (0 once shutdown began): what a source that acquires work may take."""
        ...

    def waiting(self, job_id: str) -> str | None:
        """Why a queued job has not started yet, in words; None when it is not queued
        or is about to start."""
        ...

    def unfinished(self, job_id: str) -> Job | None:
        """A job of this daemon that has not ended yet."""
        ...

    def job_log(self, job_id: str) -> JobLog | None:
        """The log of a running job, to write into."""
        ...

    async def job(self, job_id: str) -> Job | None:
        """Any job the daemon knows, finished or not."""
        ...

    async def recent_jobs(self, limit: int) -> list[Job]:
        """The most recent jobs."""
        ...

    async def history(self, job_id: str) -> list[tuple[str, float, str | None]]:
        """A job's state changes: (state, at, reason)."""
        ...

    def follow_log(self, job_id: str, offset: int, *, follow: bool) -> AsyncIterator[bytes]:
        """A job's log from ``offset``; with ``follow``, until the job ends."""
        ...

    def status(self) -> dict[str, Any]:
        """Capacity, queue and VMs, for `snapfleet status`."""
        ...


class JobSource(Protocol):
    """Something that turns outside requests into jobs."""

    name: str
    """Recorded as the ``source`` of the jobs it submits."""
    requeue_on_restart: bool
    """Whether its jobs still queued when the daemon died may run after a restart
    (False when the source's side of the job lived in the old daemon's memory)."""

    def open(self) -> AbstractAsyncContextManager[None]:
        """Listen for work from entering until leaving (entered before READY, left
        after running jobs drained)."""
        ...

    def status(self) -> dict[str, Any]:
        """What the source adds to the daemon's status (may be empty)."""
        ...
