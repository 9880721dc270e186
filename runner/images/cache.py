"""Content-addressed, layered artifact cache.

Layout under ``cache_dir``::

    kernel-<key>/        vmlinux, modules/<version>/..., config, kernel.json
    rootfs-base-<key>/   base.tar (debootstrap tree), packages.txt
    initramfs-<key>/     initramfs.cpio.gz, initramfs.json
    image-<key>/         vmlinux, initramfs.cpio.gz, rootfs.ext4, manifest.json
    .tmp-<layer>-<key>-<pid>-<random>/   a layer being built

A layer is built in a temporary directory next to its final place and renamed
into place only when complete, so a directory named ``<layer>-<key>`` is
always whole. The key of each layer hashes exactly the inputs that change
its bytes, so editing the agent rebuilds only the final image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
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
