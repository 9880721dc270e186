"""One GitLab job's work in its VM: the daemon's `Work` for a job of the GitLab source.

`GuestRun.work` puts the dependencies' artifacts and the project's caches
(`runner.forge.gitlab.cache`) in the guest, runs the job script
(`runner.forge.gitlab.script`) under bash with its output masked into the
trace and the daemon's job log, stops it when GitLab cancels the job, reads
the caches and artifact archives back, keeps the one and uploads the other
(artifacts GitLab does not get fail the job). It records how GitLab should
hear of the job (`GuestRun.result`); `gitlab_outcome` answers that when the
work never ran (cancelled while queued, a failed restore).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import ForgeError, ForgeUnavailable
from runner.execution import Command, Outcome, execute
from runner.forge.gitlab._race import unless_set
from runner.forge.gitlab.cache import ProjectCaches
from runner.forge.gitlab.client import GitLabClient
from runner.forge.gitlab.layout import GuestLayout, guest_parts
from runner.forge.gitlab.payload import JobPayload
from runner.forge.gitlab.result import ResultReader, outcome
from runner.forge.gitlab.script import build_script, cache_key, pulls
from runner.forge.gitlab.session import JobOutcome, TraceStream
from runner.forge.gitlab.timeouts import host_deadline_s
from runner.forge.gitlab.trace import Masker
from runner.forge.gitlab.transfer import download_dependencies, upload_artifact
from runner.service.jobs import Job, JobState

if TYPE_CHECKING:
    from runner.service.port import JobPort
    from runner.vm.backend import Machine

BASH = "/bin/bash"
"""The job script is bash (what GitLab's ``shell`` for this executor says)."""


def red(text: str) -> bytes:
    """A line GitLab shows as an error."""
    return f"\x1b[31;1m{text}\x1b[0;m\n".encode()


class GuestRun:
    """One GitLab job's `Work`: everything done in its VM, and how it ended for GitLab."""

    def __init__(self, client: GitLabClient, job: JobPayload, trace: TraceStream,
                 layout: GuestLayout, port: JobPort, caches: ProjectCaches) -> None:
        self.client = client
        self.caches = caches
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
        cancel = asyncio.Event()
        watcher = asyncio.create_task(self._watch_cancel(cancel))
        try:
            return await self._work(machine, remaining, started, cancel)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])  # ours; a cancel of this task still propagates

    async def _work(self, machine: Machine, remaining: float, started: float,
                    cancel: asyncio.Event) -> Outcome:
        try:
            if not (await unless_set(cancel, self._put_dependencies(machine)))[0]:
                self.result = JobOutcome.failed("job_canceled")
                return Outcome(JobState.CANCELLED, reason="cancelled in GitLab")
        except ForgeError as exc:
            self.output(red(f"ERROR: downloading dependencies failed: {exc}"))
            self.result = JobOutcome.failed(
                "runner_system_failure" if isinstance(exc, ForgeUnavailable)
                else "missing_dependency_failure")
            return Outcome(JobState.FAILED, reason=f"dependencies: {exc}")
        await self._put_caches(machine)
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

        # The script enforces the job's timeout itself and still runs after_script and
        # the archives; this limit (see `host_deadline_s`) only stops a hung script.
        left = max(1.0, min(float(host_deadline_s(self.job)),
                            remaining - (time.monotonic() - started)))
        command = Command(script=build_script(self.job, self.layout), shell=BASH,
                          env={"HOME": "/root"})
        done = await execute(machine, command, sink, left,
                             timeout_s=float(self.job.timeout_s), cancel=cancel)
        cancelled = done.state is JobState.CANCELLED or cancel.is_set()
        final = outcome(reader.result, timed_out=done.state is JobState.TIMED_OUT,
                        cancelled=cancelled)
        detail = None
        if reader.result is not None and not cancelled and not self.trace.aborted.is_set():
            await self._keep_caches(machine, reader.result.caches)
            lost = await self._upload(machine, reader.result.artifacts)
            # Artifacts GitLab did not get fail the job (as gitlab-runner's uploader
            # does), unless it failed already: then its own reason stands.
            if lost is not None and final.state == "success":
                final, detail = lost
        self._log(self._log_masker.flush())
        self.result = final
        return _daemon_outcome(final, detail)

    async def _watch_cancel(self, cancel: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self.trace.cancel_requested.wait()),
                 asyncio.ensure_future(self.trace.aborted.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self.output(red("ERROR: Job was canceled in GitLab; stopping it"))
        cancel.set()

    async def _put_dependencies(self, machine: Machine) -> None:
        if not any(d.artifacts_file and d.artifacts_file.filename for d in self.job.dependencies):
            return
        with tempfile.TemporaryDirectory(prefix="snapfleet-gitlab-") as tmp:
            saved = await download_dependencies(self.client, self.job, self.trace, Path(tmp))
            archives = [(dep.id, path.read_bytes()) for dep, path in saved]
        for guest_path, data in guest_parts(self.layout.dependency_dir(), archives):
            await machine.put_file(guest_path, data, 0o600)

    async def _put_caches(self, machine: Machine) -> None:
        """The kept caches the job pulls (by key, then its fallback keys) into the guest."""
        for index, cache in enumerate(self.job.cache):
            if not pulls(cache):
                continue
            found = await asyncio.to_thread(
                self.caches.load, [cache_key(cache), *cache.fallback_keys])
            if found is None:
                continue
            for guest_path, data in guest_parts(self.layout.cache_in_dir(), [(index, found[1])]):
                await machine.put_file(guest_path, data, 0o600)

    async def _keep_caches(self, machine: Machine, indexes: tuple[int, ...]) -> None:
        for index in indexes:
            if index >= len(self.job.cache):
                continue
            key = cache_key(self.job.cache[index])
            data = await _read_file(machine, self.layout.cache_path(index))
            try:
                if data is None:
                    raise ValueError("its archive could not be read from the VM")
                await asyncio.to_thread(self.caches.store, key, data)
            except (OSError, ValueError) as exc:
                self.output(red(f"WARNING: the cache {key} was not kept: {exc}"))
                continue
            self.output(f"Kept the cache {key} on this host ({len(data)} bytes)\n".encode())

    async def _upload(self, machine: Machine, indexes: tuple[int, ...]
                      ) -> tuple[JobOutcome, str] | None:
        """Upload the archives the script left; at the first one GitLab does not get,
        stop and return how the job fails for it (and why, for the daemon's record)."""
        for index in indexes:
            if index >= len(self.job.artifacts):
                continue
            artifact = self.job.artifacts[index]
            kind = artifact.artifact_type or "archive"
            data = await _read_file(machine, self.layout.artifact_path(index))
            if data is None:
                why = f"the artifacts {kind!r} could not be read from the VM"
                self.output(red(f"ERROR: Job failed (system failure): {why}"))
                return JobOutcome.failed("runner_system_failure"), why
            try:
                await upload_artifact(self.client, self.job, self.trace, artifact, data)
            except ForgeUnavailable as exc:
                why = f"the artifacts {kind!r} were not uploaded, GitLab is unavailable: {exc}"
                self.output(red(f"ERROR: Job failed (system failure): {why}"))
                return JobOutcome.failed("runner_system_failure"), why
            except ForgeError as exc:
                why = f"the artifacts {kind!r} were refused by GitLab: {exc}"
                self.output(red(f"ERROR: Job failed: {why}"))
                return JobOutcome.failed("script_failure", 1), why
        return None



async def _read_file(machine: Machine, path: str) -> bytes | None:
    """A file's bytes from the guest (``cat``), or None when it cannot be read."""
    session = await machine.exec(Command(argv=["cat", "--", path], timeout=120))
    parts = [chunk.data async for chunk in session if chunk.stream == "stdout"]
    status = await session.wait()
    return b"".join(parts) if status.exit_code == 0 else None


def _daemon_outcome(final: JobOutcome, detail: str | None = None) -> Outcome:
    """The daemon's record of a job GitLab sees as ``final`` (``detail``: why, when the
    script's own result does not say, as for lost artifacts)."""
    if final.state == "success":
        return Outcome(JobState.SUCCEEDED, exit_code=0)
    reason = final.failure_reason or "unknown_failure"
    if reason == "job_canceled":
        return Outcome(JobState.CANCELLED, reason="cancelled in GitLab")
    if reason == "job_execution_timeout":
        return Outcome(JobState.TIMED_OUT, exit_code=final.exit_code, reason=reason)
    if reason == "runner_system_failure":
        return Outcome(JobState.SYSTEM_FAILURE,
                       reason=detail or "the job script reported no result")
    code = f", exit code {final.exit_code}" if final.exit_code is not None else ""
    why = f": {detail}" if detail else ""
    return Outcome(JobState.FAILED, exit_code=final.exit_code, reason=reason + code + why)


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


