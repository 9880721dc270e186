"""Initramfs layer: busybox, the virtio modules, and an /init that mounts root.

The cpio archive is written here rather than by ``cpio(1)`` so that device
nodes need no mknod, ownership is root without a root-owned staging tree,
and the same inputs give the same bytes.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import lzma
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runner.errors import ConfigError, ImageError
from runner.images.elf import is_static, module_depends
from runner.images.kernel import KernelInfo
from runner.proc import ProgressFn, run

INITRAMFS_FILE = "initramfs.cpio.gz"
MODULES_ORDER = "etc/snapfleet-modules"
_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class Entry:
    """One cpio member: a directory, regular file, symlink or char device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """A ``newc`` cpio archive of ``entries``, owned by root, mtime 0."""
    out = io.BytesIO()

    def member(ino: int, e: Entry) -> None:
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(e.data)
        out.write(b"\0" * (-out.tell() % 4))

    ino = 0
    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(ino + 1, Entry("TRAILER!!!", 0))
    return out.getvalue()


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` preceded by a directory entry for every missing parent."""
    seen: set[str] = set()
    result: list[Entry] = []
    for e in entries:
        for parent in reversed(PurePosixPath(e.path).parents[:-1]):
            if str(parent) not in seen:
                seen.add(str(parent))
                result.append(Entry(str(parent), stat.S_IFDIR | 0o755))
        if e.path not in seen:
            seen.add(e.path)
            result.append(e)
    return result


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in _KO_SUFFIXES:
        if name.endswith(suffix):
            return _norm(name[: -len(suffix)])
    return _norm(name)


def resolve_modules(
    wanted: Iterable[str],
    available: Mapping[str, str],
    builtin: set[str],
    depends: Mapping[str, list[str]],
) -> list[str]:
    """Load order for ``wanted``: each module after its dependencies, once.

    ``available`` maps normalised module names to their paths, ``depends`` maps
    names to their direct dependencies. Built-in modules need no loading.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in builtin or name in order:
            return
        if name not in available:
            who = f" (needed by {needed_by})" if needed_by else ""
            raise ConfigError("modules", f"kernel has no module {name!r}{who}")
        if name in visiting:
            raise ImageError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in depends.get(name, []):
            visit(_norm(dep), name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(_norm(name), None)
    return order


async def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod loads only plain .ko files."""
    name = path.name
    if name.endswith(".ko.zst"):
        return await run("zstd", "-dc", path, what=f"zstd -dc {name}")
    raw = await asyncio.to_thread(path.read_bytes)
    if name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    return raw


async def module_entries(modules: Iterable[str], moddir: Path) -> tuple[list[str], list[Entry]]:
    """Resolve ``modules`` in the kernel's ``moddir`` into ordered cpio entries."""
    builtin_file = moddir / "modules.builtin"
    builtin_text = await asyncio.to_thread(builtin_file.read_text)
    builtin = {_module_name(Path(line)) for line in builtin_text.split()}
    found = await asyncio.to_thread(lambda: list(moddir.rglob("*.ko*")))
    available = {_module_name(p): p for p in found if p.name.endswith(_KO_SUFFIXES)}
    blobs: dict[str, bytes] = {}
    depends: dict[str, list[str]] = {}
    pending = [_norm(m) for m in modules]
    while pending:
        name = pending.pop()
        if name in blobs or name in builtin or name not in available:
            continue
        blobs[name] = await _read_module(available[name])
        depends[name] = module_depends(blobs[name])
        pending.extend(_norm(d) for d in depends[name])
    order = resolve_modules(modules, {n: str(p) for n, p in available.items()}, builtin, depends)
    entries = [Entry(f"lib/modules/{n}.ko", stat.S_IFREG | 0o644, blobs[n]) for n in order]
    listing = "".join(f"{n}.ko\n" for n in order).encode()
    entries.append(Entry(MODULES_ORDER, stat.S_IFREG | 0o644, listing))
    return order, entries


async def busybox_entries(busybox: Path) -> list[Entry]:
    """busybox at /bin/busybox plus a symlink for each of its applets."""
    try:
        data = await asyncio.to_thread(busybox.read_bytes)
    except OSError as exc:
        raise ConfigError("busybox", f"cannot read {busybox}: {exc}") from exc
    if not is_static(data):
        raise ConfigError("busybox", f"{busybox} is dynamically linked; install busybox-static")
    applets = (await run(busybox, "--list-full", what="busybox --list-full")).decode().split()
    entries = [Entry("bin/busybox", stat.S_IFREG | 0o755, data)]
    for applet in applets:
        if applet.strip("/") != "bin/busybox":
            entries.append(Entry(applet.strip("/"), stat.S_IFLNK | 0o777, b"/bin/busybox"))
    return entries


async def build_initramfs_layer(
    kernel_layer: Path,
    kernel: KernelInfo,
    init_script: bytes,
    modules: Iterable[str],
    busybox: Path,
    out: Path,
    progress: ProgressFn,
) -> list[str]:
    """Write ``initramfs.cpio.gz`` into ``out``; return the module load order."""
    progress(f"making initramfs for {kernel.version}")
    order, mod_entries = await module_entries(modules, kernel_layer / kernel.modules_dir)
    entries = [
        Entry("init", stat.S_IFREG | 0o755, init_script),
        # The kernel opens /dev/console for /init's stdio before devtmpfs exists.
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("proc", stat.S_IFDIR | 0o755),
        Entry("sys", stat.S_IFDIR | 0o755),
        Entry("newroot", stat.S_IFDIR | 0o755),
        *await busybox_entries(busybox),
        *mod_entries,
    ]
    archive = newc_archive(with_parents(entries))
    compressed = await asyncio.to_thread(gzip.compress, archive, 6, mtime=0)
    await asyncio.to_thread((out / INITRAMFS_FILE).write_bytes, compressed)
    meta = {"kernel_version": kernel.version, "modules": order}
    (out / "initramfs.json").write_text(json.dumps(meta, indent=2) + "\n")
    return order
