"""Copy-on-write disks: each clone writes to its own qcow2 overlay.

The base (a snapshot's disk) is never written once the snapshot exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from runner.errors import VMError
from runner.proc import run


async def create_overlay(
    base: Path,
    overlay: Path,
    *,
    qemu_img: str = "qemu-img",
    backing_path: Path | None = None,
) -> Path:
    """Make ``overlay`` a qcow2 backed by the raw ``base``; VMError on failure.

    ``backing_path`` records a different path for the base than where it is
    now (a snapshot is built in a temporary directory, then renamed).
    """
    if not base.exists():
        raise VMError(f"base disk {base} does not exist")
    size = base.stat().st_size
    backing = str(backing_path or base.resolve())
    try:
        await run(qemu_img, "create", "-q", "-f", "qcow2", "-u", "-o", "lazy_refcounts=on",
                  "-b", backing, "-F", "raw", overlay, str(size),
                  what="qemu-img create overlay", error=VMError)
    except BaseException:
        remove(overlay)
        raise
    os.chmod(overlay, 0o600)
    return overlay


async def clone_overlay(template: Path, overlay: Path) -> Path:
    """Copy a snapshot's empty overlay (a few hundred KiB) instead of running qemu-img.

    The template overlay already names the snapshot's disk as its backing file.
    """
    try:
        await asyncio.to_thread(shutil.copyfile, template, overlay)
        os.chmod(overlay, 0o600)
    except OSError as exc:
        remove(overlay)
        raise VMError(f"cannot copy overlay {template}: {exc}") from exc
    return overlay


async def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a raw disk keeping holes (and sharing extents where the filesystem can)."""
    await run("cp", "--sparse=always", "--reflink=auto", src, dst, what=f"copying {src}",
              error=VMError)


def remove(path: Path) -> None:
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
