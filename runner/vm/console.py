"""The guest's serial console: kept to a bounded file, and watched for the guest's end.

QEMU writes the console into a pipe and Snapfleet reads the other end, so a
guest writing to ``/dev/ttyS0`` without end costs a bounded file, not the
host's disk. ``ConsoleWatch`` is the pure part (bytes in, how the
guest ended out); ``ConsoleLog`` is the reader around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from pathlib import Path
from typing import Literal

GuestEnd = Literal["panicked", "rebooted", "powered off", "halted"]

# What the kernel prints, at KERN_EMERG (so also under `quiet`), as the guest ends.
# With `panic=-1` a panic resets at once, without the "reboot:" line; `-no-reboot`
# then makes QEMU exit.
_MARKERS: tuple[tuple[bytes, GuestEnd], ...] = (
    (b"Kernel panic - not syncing", "panicked"),
    (b"reboot: Restarting system", "rebooted"),
    (b"reboot: Power down", "powered off"),
    (b"reboot: System halted", "halted"),
)
_LONGEST = max(len(marker) for marker, _ in _MARKERS)
READ_SIZE = 65536
# QEMU's serial writes each byte on its own. A pipe gathers them into pages (a
# socket would queue one buffer per byte, costing its reader ~2 us a byte), and
# reading a batch every READ_PAUSE_S instead of waking per byte keeps a guest
# running `yes > /dev/ttyS0` from costing the host a core.
PIPE_SIZE = 2**20  # what an unprivileged process may ask for by default
READ_PAUSE_S = 0.01


# QEMU's SHUTDOWN reasons for a guest that ended itself without a word on the
# console (sysrq "b", a triple fault); `-no-reboot` turns a reset into a shutdown.
_SHUTDOWN_REASONS: dict[str, GuestEnd] = {
    "guest-reset": "rebooted",
    "guest-shutdown": "powered off",
    "guest-panic": "panicked",
}


def end_from_shutdown(reason: str | None) -> GuestEnd | None:
    """How the guest ended, given QEMU's SHUTDOWN reason; None if not by the guest."""
    return None if reason is None else _SHUTDOWN_REASONS.get(reason)


def console_pipe() -> tuple[int, int]:
    """(ours, QEMU's): a close-on-exec pipe that can hold a batch of console bytes."""
    ours, theirs = os.pipe()
    with contextlib.suppress(OSError):  # the default 64 KiB still works
        fcntl.fcntl(theirs, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return ours, theirs


def describe(end: GuestEnd) -> str:
    """The reason a job gets when its guest ended this way."""
    return "guest kernel panicked" if end == "panicked" else f"guest {end}"


class ConsoleWatch:
    """The last ``keep`` bytes of a console, and the first sign that the guest ended."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.end: GuestEnd | None = None
        self._tail = bytearray()

    @property
    def data(self) -> bytes:
        """The bytes kept: the console's newest ``keep`` bytes."""
        return bytes(self._tail)

    def feed(self, data: bytes) -> GuestEnd | None:
        """Take console bytes; return how the guest ended if these bytes first say so."""
        # Scan only what is new, plus enough before it for a marker split across reads.
        start = max(0, len(self._tail) - _LONGEST + 1)
        self._tail += data
        found: GuestEnd | None = None
        if self.end is None:
            window = self._tail[start:]
            hits = [(window.find(m), end) for m, end in _MARKERS if m in window]
            if hits:
                found = self.end = min(hits)[1]
        del self._tail[: max(0, len(self._tail) - self.keep)]
        return found

    def tail(self, lines: int = 60) -> str:
        """At most ``lines`` lines, printable, for a job log or an error: from just
        before the guest's end (a panic's message leads its backtrace) or the last ones."""
        text = self._tail.decode(errors="replace").replace("\r", "")
        all_lines = text.rstrip("\n").split("\n")
        marker = next((m.decode() for m, end in _MARKERS if end == self.end), None)
        at = next((i for i, line in enumerate(all_lines) if marker and marker in line), None)
        if at is None:
            return "\n".join(all_lines[-lines:])
        return "\n".join(all_lines[max(0, at - 3) :][:lines])


class ConsoleLog:
    """Reads QEMU's console pipe until EOF into ``path``, never past ``max_bytes``.

    When the file would grow past the cap it is rewritten with the newest half,
    so it always ends with the latest output. ``ended`` is set when the guest
    says it is ending or QEMU closes the console (it exited).
    """

    def __init__(self, pipe: int, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.watch = ConsoleWatch(max_bytes // 2)
        self.ended = asyncio.Event()
        self.error: str | None = None
        self._pipe: int | None = pipe  # ours to close
        self._size = 0
        self._reader: asyncio.Task[None] | None = None
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )

    def start(self, name: str) -> None:
        """Read in a task of this console's own until QEMU closes its end, or ``stop``."""
        self._reader = asyncio.create_task(self._run(), name=name)

    async def stop(self, drain: float = 1.0) -> None:
        """Read on to EOF for at most ``drain`` seconds (QEMU is gone), then stop and
        close everything. Idempotent; ``error`` says what went wrong, if anything."""
        reader = self._reader
        if reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), drain)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._close_file()
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    async def _run(self) -> None:
        assert self._pipe is not None
        os.set_blocking(self._pipe, False)
        try:
            while data := await _read(self._pipe):
                if self.watch.feed(data) is not None:
                    self.ended.set()
                self._write(data)
                if len(data) < READ_SIZE:
                    await asyncio.sleep(READ_PAUSE_S)  # let the next batch gather
        except OSError as exc:
            self.error = f"reading the console: {exc}"
        finally:
            self.ended.set()
            self._close_file()

    def _write(self, data: bytes) -> None:
        # Page-cache writes of at most max_bytes: local and brief, like the job log's.
        if self._fd is None:
            return
        try:
            if self._size + len(data) <= self.max_bytes:
                self._size += os.write(self._fd, data)
                return
            kept = self.watch.data
            os.ftruncate(self._fd, 0)
            self._size = os.pwrite(self._fd, kept, 0)
            os.lseek(self._fd, self._size, os.SEEK_SET)
        except OSError as exc:
            # Keep reading (a console nobody reads stalls the guest); stop writing.
            self.error = f"writing {self.path}: {exc}"
            self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def _read(fd: int) -> bytes:
    """The bytes waiting in non-blocking ``fd`` once it is readable; b"" at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        with contextlib.suppress(BlockingIOError):
            return os.read(fd, READ_SIZE)
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
