"""Job logs on disk: one file per job, size-limited, followable while the job runs.

Files are 0600: a job's output may contain whatever secrets it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

READ_CHUNK = 64 * 1024


class JobLog:
    """The log of one running job."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self.truncated = False
        self.closed = False
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._changed = asyncio.Event()

    def write(self, data: bytes) -> None:
        """Append job output; past the limit it is dropped, once with a note."""
        if self.closed or self.truncated:
            return
        room = self.limit - self.size
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self._append(data)
        if self.truncated:
            self._append(f"\n[snapfleet] log limit of {self.limit} bytes reached; "
                         "further output dropped\n".encode())

    def note(self, text: str) -> None:
        """A line from Snapfleet itself (restore progress, outcome)."""
        if not self.closed:
            self._append(f"[snapfleet] {text}\n".encode())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            self._changed.set()

    async def changed(self, timeout: float) -> None:
        """Wait until something is written (or the log closes), at most ``timeout``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    def _append(self, data: bytes) -> None:
        if data:
            os.write(self._fd, data)
            self.size += len(data)
            self._changed.set()


class LogStore:
    """All job logs under one directory."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.live: dict[str, JobLog] = {}
        self._opened: dict[str, asyncio.Event] = {}  # followers waiting for a job to start
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.log"

    def open(self, job_id: str) -> JobLog:
        log = JobLog(self.path(job_id), self.limit)
        self.live[job_id] = log
        if (opened := self._opened.pop(job_id, None)) is not None:
            opened.set()
        return log

    def close(self, job_id: str) -> None:
        log = self.live.pop(job_id, None)
        if log is not None:
            log.close()
        if (opened := self._opened.pop(job_id, None)) is not None:
            opened.set()  # ended without starting (cancelled while queued)

    async def follow(
        self, job_id: str, offset: int = 0, *, finished: Callable[[], bool] | None = None
    ) -> AsyncIterator[bytes]:
        """Log bytes from ``offset``.

        With ``finished``, keep following (through a job still queued, whose log
        does not exist yet) until it returns True and the log is read to its end.
        """
        try:
            async for data in self._follow(job_id, offset, finished):
                yield data
        finally:
            opened = self._opened.get(job_id)
            if opened is not None and not opened.is_set():
                self._opened.pop(job_id)  # the job never started (or we stopped watching)

    async def _follow(
        self, job_id: str, position: int, finished: Callable[[], bool] | None
    ) -> AsyncIterator[bytes]:
        path = self.path(job_id)
        while True:
            done = finished is None or finished()
            data = await asyncio.to_thread(_read_from, path, position)
            if data:
                position += len(data)
                yield data
                continue
            if done:
                return
            live = self.live.get(job_id)
            if live is None:  # not started yet: woken when it is (or looks again in 1 s)
                opened = self._opened.setdefault(job_id, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(opened.wait(), 1.0)
            else:
                await live.changed(timeout=1.0)

    def purge(self, older_than_s: float) -> list[str]:
        """Delete logs of finished jobs older than ``older_than_s``; returns their job ids."""
        cutoff = time.time() - older_than_s
        gone = []
        for path in self.directory.glob("*.log"):
            job_id = path.stem
            if job_id not in self.live and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                gone.append(job_id)
        return gone


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(READ_CHUNK)
    except FileNotFoundError:
        return b""
