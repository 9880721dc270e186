"""Content-addressed, layered artifact cache.

Layout under ``cache_dir``::

    kernel-<key>/        vmlinux, modules/<version>/..., config, kernel.json
    rootfs-base-<key>/   base.tar (debootstrap tree), packages.txt
    initramfs-<key>/     initramfs.cpio.gz, initramfs.json
    image-<key>/         vmlinux, initramfs.cpio.gz, rootfs.ext4, manifest.json
    .tmp-<layer>-<key>-<pid>-<random>/   a layer being built
    downloads/<hash>-<name>              archives fetched for recipes

A layer is built in a temporary directory next to its final place and renamed
into place only when complete, so a directory named ``<layer>-<key>`` is
always whole. The key of each layer hashes exactly the inputs that change
its bytes, so editing the agent rebuilds only the final image.

A build holds a shared ``flock`` on every layer (and download) it uses until it
ends (`Holds`); ``snapfleet cache gc`` takes the exclusive lock without waiting
and moves an entry aside only while it has it (`detach`), so the two never race:
a build either holds a layer gc then skips, or finds it gone and rebuilds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

KEY_LENGTH = 16
_TMP_PREFIX = ".tmp-"


def digest(data: Any) -> str:
    """sha256 hex of ``data`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    """sha256 hex of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in chunks (blocking: call via a thread)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def layer_path(cache_dir: Path, layer: str, key: str) -> Path:
    """Final directory of ``layer`` built for ``key``."""
    return cache_dir / f"{layer}-{key[:KEY_LENGTH]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(cache_dir: Path) -> list[Path]:
    """Delete temporary layer dirs left by builds whose process is gone.

    Temp names end in ``-<pid>-<random>``; a live pid means a build in
    progress (maybe in another process), which is left alone.
    """
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    for entry in cache_dir.iterdir():
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        pid_text = entry.name.rsplit("-", 2)[-2]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _make_temp(cache_dir: Path, layer: str, key: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{_TMP_PREFIX}{layer}-{key[:KEY_LENGTH]}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir))


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        # A forced rebuild: move the old layer aside (the stale-temp sweep
        # would collect it if we died now), then swap the new one in.
        old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{os.getpid()}-", dir=final.parent))
        final.rename(old / final.name)
        shutil.rmtree(old, ignore_errors=True)
    tmp.chmod(0o755)  # mkdtemp makes 0700; an unprivileged VMM must read images
    try:
        tmp.rename(final)
    except OSError:
        # Another build committed the same key first; equal keys mean equal content.
        if not final.is_dir():
            raise


def _discard(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def building(cache_dir: Path, layer: str, key: str) -> AsyncIterator[Path]:
    """Yield a fresh temp dir for ``layer``; rename it into place on success.

    On any exception (cancellation included) the temp dir is removed and the
    exception propagates, so ``<layer>-<key>`` exists only when complete.
    """
    tmp = await asyncio.to_thread(_make_temp, cache_dir, layer, key)
    try:
        yield tmp
        await asyncio.to_thread(_commit, tmp, layer_path(cache_dir, layer, key))
    finally:
        await asyncio.shield(asyncio.to_thread(_discard, tmp))


class Holds:
    """Shared locks on cache entries a build is using; gc leaves held entries alone.

    Use as ``with Holds() as holds:``; every lock is dropped when the block ends
    (or when the process dies).
    """

    def __init__(self) -> None:
        self._fds: list[int] = []

    def take(self, path: Path) -> bool:
        """Share-lock ``path`` (a layer directory or a download); False if it is gone.

        Blocks only while gc is moving that very entry aside (a rename). The entry
        is checked to still sit at ``path`` once locked: gc may have taken it away
        between the caller's look and the lock. Tiny: fine on the calling thread.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            there = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            there = False
        except BaseException:
            os.close(fd)
            raise
        if not there:
            os.close(fd)
            return False
        self._fds.append(fd)
        return True

    def release(self) -> None:
        """Drop every lock. Idempotent."""
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Holds:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def detach(path: Path) -> Path | None:
    """Move cache entry ``path`` aside for deletion unless a build holds it.

    Takes the entry's exclusive lock without waiting: None if a build holds it
    (or it is already gone). Otherwise renames it into a fresh temp directory
    beside it and returns that directory, for the caller to delete; the name is a
    stale-temp name, so if the caller dies half-way the next build's sweep (or the
    next gc) finishes the job.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        aside = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}gc-{os.getpid()}-", dir=path.parent))
        try:
            path.rename(aside / path.name)
        except BaseException:
            aside.rmdir()
            raise
        return aside
    finally:
        os.close(fd)  # a build waiting on the lock now finds the entry gone


def temp_owner(name: str) -> int | None:
    """The pid in a temp entry's name (``.tmp-...-<pid>-<random>``), or None if not one."""
    if not name.startswith(_TMP_PREFIX):
        return None
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (in this pid namespace)."""
    return _pid_alive(pid)
