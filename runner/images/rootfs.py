"""Root filesystem: a debootstrap base layer, then guest files and an ext4 image.

The ext4 image is made with ``mkfs.ext4 -d`` from a staged tree, so no loop
device or mount is needed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner.errors import ImageError
from runner.images.archives import ResolvedArchive, put
from runner.proc import ProgressFn, run, tail

BASE_TAR = "base.tar"
PACKAGES_FILE = "packages.txt"
ROOTFS_FILE = "rootfs.ext4"
FS_LABEL = "snapfleet-root"
# Host state debootstrap copies in, and caches that only bloat the image.
_SCRUB = ("etc/resolv.conf", "etc/hostname", "var/cache/apt/archives", "var/lib/apt/lists")
_TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


async def build_base_layer(
    *,
    suite: str,
    mirror: str,
    variant: str,
    components: tuple[str, ...],
    packages: tuple[str, ...],
    out: Path,
    progress: ProgressFn,
) -> dict[str, str]:
    """debootstrap into ``out/base.tar``; return the installed package versions."""
    tree = out / "tree"
    argv: list[str] = [f"--variant={variant}", f"--components={','.join(components)}"]
    if packages:
        argv.append(f"--include={','.join(packages)}")
    progress(f"debootstrap {suite} from {mirror} (this takes a few minutes)")
    try:
        await run("debootstrap", *argv, suite, tree, mirror, what=f"debootstrap {suite}")
    except ImageError as exc:
        log = tree / "debootstrap" / "debootstrap.log"
        detail = tail(await asyncio.to_thread(log.read_bytes)) if log.is_file() else ""
        raise ImageError(f"debootstrap failed: {detail or exc}") from exc

    for rel in _SCRUB:
        await asyncio.to_thread(_scrub, tree / rel)
    listing = await run(
        "dpkg-query",
        f"--admindir={tree}/var/lib/dpkg",
        "-W",
        "-f",
        "${Package} ${Version}\n",
        what="dpkg-query (list guest packages)",
    )
    (out / PACKAGES_FILE).write_bytes(listing)
    progress("archiving base rootfs")
    await run("tar", *_TAR_FLAGS, "-C", tree, "-cf", out / BASE_TAR, ".", what="tar base rootfs")
    await asyncio.to_thread(shutil.rmtree, tree)
    return read_packages(listing.decode())


def read_packages(listing: str) -> dict[str, str]:
    """Parse ``packages.txt`` (``name version`` lines)."""
    pairs = (line.split(" ", 1) for line in listing.splitlines() if " " in line)
    return {name: version for name, version in pairs}


def _scrub(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                # Keep apt's "partial" dirs so apt works in the guest.
                continue
            child.unlink()
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_files(stage: Path, files: Mapping[str, tuple[int, bytes]]) -> None:
    for rel, (mode, data) in files.items():
        dest = stage / rel
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise ImageError(f"guest file /{rel} would replace a non-file in the base rootfs")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        os.chown(dest, 0, 0)
        dest.chmod(mode)


async def build_rootfs_image(
    *,
    base_layer: Path,
    files: Mapping[str, tuple[int, bytes]],
    archives: Sequence[ResolvedArchive] = (),
    size_mib: int,
    out: Path,
    work: Path,
    progress: ProgressFn,
) -> Path:
    """Unpack the base, then put ``archives`` (tarballs unpacked at, single files
    installed as, their ``dest``), add ``files`` (guest path -> (mode, bytes)), and
    mkfs.ext4 the tree."""
    stage = work / "stage"
    stage.mkdir()
    progress("unpacking base rootfs")
    await run("tar", *_TAR_FLAGS, "-C", stage, "-xpf", base_layer / BASE_TAR, what="untar base")
    for archive in archives:
        verb = "installing {} as {}" if archive.format == "file" else "unpacking {} into {}"
        progress(verb.format(archive.path.name, archive.dest))
        await asyncio.to_thread(put, archive, stage)
    await asyncio.to_thread(_write_files, stage, files)

    progress(f"making ext4 rootfs {size_mib} MiB")
    image = out / ROOTFS_FILE
    with image.open("wb") as f:
        f.truncate(size_mib << 20)  # sparse: only written blocks take space
    await run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        FS_LABEL,
        "-d",
        stage,
        # Initialise inode tables and journal now: lazy init would make the
        # guest write them in the background, into every clone's overlay.
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        image,
        what="mkfs.ext4",
    )
    await asyncio.to_thread(shutil.rmtree, stage)
    return image
