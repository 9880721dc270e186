"""Run external tools (debootstrap, qemu-img, cp, ...) without blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from runner.errors import HostError, ImageError, SnapfleetError

# Where a missing tool comes from, so the error says what to install.
_TOOL_PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "lz4": "lz4",
    "zstd": "zstd",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "tar": "tar",
    "qemu-img": "qemu-utils",
    "cp": "coreutils",
}

TAIL_LINES = 20

ProgressFn = Callable[[str], None]
"""Receives human-readable build step messages."""


def tail(text: bytes | str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text``, for error messages."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


async def run(
    *argv: str | Path,
    what: str,
    cwd: Path | None = None,
    stdin: Path | None = None,
    stdout: Path | None = None,
    env: dict[str, str] | None = None,
    error: Callable[[str], SnapfleetError] = ImageError,
) -> bytes:
    """Run ``argv`` and return its stdout (empty if redirected to ``stdout``).

    Raises ``error`` (default ``ImageError``) naming ``what`` with the tail of
    stderr when the command fails, and ``HostError`` when the tool is not installed. On
    cancellation the whole process group is killed before re-raising, so a
    cancelled build leaves no debootstrap running behind it.
    """
    args = [str(a) for a in argv]
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(stdin.open("rb")) if stdin else asyncio.subprocess.DEVNULL
        fout = stack.enter_context(stdout.open("wb")) if stdout else asyncio.subprocess.PIPE
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                cwd=cwd,
                stdin=fin,
                stdout=fout,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "LC_ALL": "C", **(env or {})},
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            tool = os.path.basename(args[0])
            pkg = _TOOL_PACKAGES.get(tool, tool)
            raise HostError(f"{tool} not found; install the Debian package {pkg!r}") from exc
        try:
            out, err = await proc.communicate()
        except BaseException:
            # Includes CancelledError: kill the group (debootstrap forks
            # dpkg and friends), reap, and let the exception through.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
    if proc.returncode != 0:
        detail = tail(err) or tail(out or b"")
        raise error(f"{what} failed (exit {proc.returncode}): {detail or 'no output'}")
    return out or b""
