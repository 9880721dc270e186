"""Reclaiming the image and snapshot cache: what is superseded, and removing it.

Every change of a recipe, the agent, the template revision or QEMU makes new
layers and snapshots and leaves the old ones behind. ``plan`` decides, as a pure
function over a listing, what may go: an entry is kept when the current config
resolves to it, when it was used within the keep window, when a process has it
open or mapped, or when a kept entry needs it (an image its layers and
downloads, a snapshot its image). ``scan``, ``processes_using`` and ``remove``
do the I/O around it. Names the cache does not make are never listed, so never
removed: the cache directory may be shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from runner.errors import SnapfleetError
from runner.images import archives, keys
from runner.images.archives import DOWNLOADS
from runner.images.cache import KEY_LENGTH, detach, layer_path, pid_alive, temp_owner
from runner.images.image import MANIFEST
from runner.images.recipe import load_recipe
from runner.snapshots import LAYER as SNAPSHOT_LAYER
from runner.snapshots import SNAPSHOTS_DIR

DAY_S = 86400.0
IMAGE_LAYERS = ("kernel", "rootfs-base", "initramfs", "image")
_KEY = f"[0-9a-f]{{{KEY_LENGTH}}}"
_LAYER_RE = re.compile(rf"^({'|'.join(map(re.escape, IMAGE_LAYERS))})-{_KEY}$")
_SNAPSHOT_RE = re.compile(rf"^{SNAPSHOT_LAYER}-{_KEY}$")
_DOWNLOAD_RE = re.compile(rf"^{_KEY}-[^/]+$")
# Not a sign of use: gc and every loader read it, and it is tiny.
_METADATA = frozenset({MANIFEST})


class Kind(StrEnum):
    KERNEL = "kernel"
    ROOTFS_BASE = "rootfs-base"
    INITRAMFS = "initramfs"
    IMAGE = "image"
    SNAPSHOT = "snapshot"
    DOWNLOAD = "download"
    TEMP = "temp"
    """A build's temp dir (``.tmp-...-<pid>-...``): garbage once its process is gone."""


class Keep(StrEnum):
    """Why an entry stays."""

    CURRENT = "current"
    IN_USE = "in use"
    RECENT = "recently used"
    NEEDED = "needed by a kept entry"
    BUILDING = "build in progress"


Inode = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class Entry:
    """One thing in the cache: a layer, snapshot, download or build temp dir."""

    name: str
    """Path relative to the cache dir: ``image-<key>``, ``snapshots/snapshot-<key>``..."""
    kind: Kind
    used_at: float
    """Newest sign of use (epoch seconds): any file's mtime, or the atime of a file
    no other entry shares (a hard-linked kernel is read for every image)."""
    inodes: Mapping[Inode, tuple[int, int]] = field(default_factory=dict)
    """Its files: inode -> (bytes allocated, link count)."""
    needs: frozenset[str] = frozenset()
    """Entries it is made from or restored with (by name)."""
    owner_pid: int | None = None
    """A temp dir's builder."""

    @property
    def size(self) -> int:
        return sum(blocks for blocks, _ in self.inodes.values())


@dataclass(frozen=True)
class Verdict:
    entry: Entry
    keep: Keep | None
    """Why it stays; None: it goes."""


def plan(
    entries: Iterable[Entry],
    current: Iterable[str],
    in_use: Iterable[str],
    *,
    now: float,
    keep_s: float,
    alive: Callable[[int], bool] = pid_alive,
) -> list[Verdict]:
    """Decide, for each entry, whether it stays and why (pure but for ``alive``).

    Kept: what the current config resolves to (``current``); what a process has
    open or mapped (``in_use``); a temp dir whose builder lives; anything used
    within ``keep_s`` seconds; and, transitively, what a kept entry needs. Temp
    dirs of dead builders go whatever their age, as every build's own sweep does.
    """
    listed = {e.name: e for e in entries}
    current, in_use = set(current), set(in_use)
    reasons: dict[str, Keep] = {}
    for e in listed.values():
        if e.kind is Kind.TEMP:
            if e.owner_pid is not None and alive(e.owner_pid):
                reasons[e.name] = Keep.BUILDING
        elif e.name in current:
            reasons[e.name] = Keep.CURRENT
        elif e.name in in_use:
            reasons[e.name] = Keep.IN_USE
        elif now - e.used_at < keep_s:
            reasons[e.name] = Keep.RECENT
    todo = list(reasons)
    while todo:
        for needed in listed[todo.pop()].needs:
            if needed in listed and needed not in reasons:
                reasons[needed] = Keep.NEEDED
                todo.append(needed)
    return [Verdict(e, reasons.get(e.name)) for e in sorted(listed.values(), key=_order)]


def _order(e: Entry) -> tuple[int, str]:
    return (list(Kind).index(e.kind), e.name)


def freed(removed: Iterable[Entry]) -> int:
    """Bytes the disk gets back when ``removed`` go: an inode counts only when all its
    links are among them (an image's kernel is a hard link to the kernel layer's)."""
    links: dict[Inode, int] = {}
    sizes: dict[Inode, tuple[int, int]] = {}
    for e in removed:
        for inode, info in e.inodes.items():
            links[inode] = links.get(inode, 0) + 1
            sizes[inode] = info
    return sum(size for inode, (size, nlink) in sizes.items() if links[inode] >= nlink)


def entry_of(relative: str) -> str | None:
    """The entry a path inside the cache dir (relative to it) belongs to, if any."""
    parts = relative.split("/")
    if parts[0] in (SNAPSHOTS_DIR, DOWNLOADS):
        return "/".join(parts[:2]) if len(parts) > 1 else None
    return parts[0] or None


# --- I/O: what the current config resolves to --------------------------------------


def recipe_roots(
    name: str, *, cache_dir: Path, recipes_dir: Path | None, environ: Mapping[str, str]
) -> tuple[set[str], list[str]]:
    """Entries recipe ``name`` resolves to now: its layers, its image, its downloads.

    Reads the recipe and its inputs as a build would (blocking), builds nothing.
    Returns the entry names and the problems met: an ``env:`` archive whose
    variable is unset here (the daemon's environment may have it) leaves the
    image's own key unknown, but not its kernel, base and initramfs layers.
    """
    loaded = load_recipe(name, recipes_dir)
    names: set[str] = set()
    problems: list[str] = []
    found: tuple[archives.ResolvedArchive, ...] | None = ()
    try:
        for archive in loaded.recipe.archives:
            source = archives.resolve_source(archive, loaded.directory, environ)
            if isinstance(source, str):
                names.add(_relative(cache_dir, archives.download_path(cache_dir, source)))
        found = archives.locate(loaded, cache_dir, environ)
    except SnapfleetError as exc:
        problems.append(f"image {name}: {exc}; its image is kept only by age")
        found = None
    k = keys.layer_keys(keys.gather_inputs(loaded, found or ()))
    for layer, key in (("kernel", k.kernel), ("rootfs-base", k.rootfs_base),
                       ("initramfs", k.initramfs)):
        names.add(layer_path(cache_dir, layer, key).name)
    if found is not None:
        names.add(layer_path(cache_dir, "image", k.image).name)
    return names, problems


def snapshot_root(cache_dir: Path, key: str) -> str:
    """The entry name of the snapshot with ``key`` (see `runner.snapshots.snapshot_key`)."""
    root = cache_dir / SNAPSHOTS_DIR
    return _relative(cache_dir, layer_path(root, SNAPSHOT_LAYER, key))


def _relative(cache_dir: Path, path: Path) -> str:
    return path.relative_to(cache_dir).as_posix()


# --- I/O: listing --------------------------------------------------------------------


def scan(cache_dir: Path) -> tuple[list[Entry], list[str]]:
    """List the entries the cache makes under ``cache_dir`` (blocking).

    Returns the entries and the problems met (an entry that could not be read is
    left out, so it is kept).
    """
    entries: list[Entry] = []
    problems: list[str] = []
    places = (
        (cache_dir, "", _LAYER_RE),
        (cache_dir / SNAPSHOTS_DIR, f"{SNAPSHOTS_DIR}/", _SNAPSHOT_RE),
        (cache_dir / DOWNLOADS, f"{DOWNLOADS}/", _DOWNLOAD_RE),
    )
    for directory, prefix, ours in places:
        try:
            names = sorted(p.name for p in directory.iterdir())
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"cannot list {directory}: {exc}")
            continue
        for name in names:
            path = directory / name
            owner = temp_owner(name)
            if owner is None and not ours.match(name):
                continue
            if owner is not None and not path.is_dir():
                continue
            try:
                entries.append(_read_entry(path, prefix + name, owner))
            except OSError as exc:
                problems.append(f"cannot read {path}: {exc}")
    return entries, problems


def _read_entry(path: Path, name: str, owner: int | None) -> Entry:
    inodes: dict[Inode, tuple[int, int]] = {}
    st = path.lstat()
    used = st.st_mtime
    for file, fst in _walk(path):
        inodes[(fst.st_dev, fst.st_ino)] = (fst.st_blocks * 512, fst.st_nlink)
        used = max(used, fst.st_mtime)
        if fst.st_nlink == 1 and file.name not in _METADATA:
            used = max(used, fst.st_atime)
    if owner is not None:
        kind = Kind.TEMP
    elif name.startswith(f"{DOWNLOADS}/"):
        kind = Kind.DOWNLOAD
    elif name.startswith(f"{SNAPSHOTS_DIR}/"):
        kind = Kind.SNAPSHOT
    else:
        kind = Kind(name.rsplit("-", 1)[0])
    needs = _needs(path, kind)
    return Entry(name, kind, used, inodes, needs, owner)


def _walk(path: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every non-directory under ``path`` (or ``path`` itself) with its lstat."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        yield path, st
        return
    for root, dirs, files in os.walk(path):
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            file = Path(root, name)
            yield file, file.lstat()
        # st_blocks of directories themselves: small, left out.


def _needs(path: Path, kind: Kind) -> frozenset[str]:
    if kind not in (Kind.IMAGE, Kind.SNAPSHOT):
        return frozenset()
    manifest = _read_manifest(path / MANIFEST)
    if manifest is None:
        return frozenset()
    if kind is Kind.SNAPSHOT:
        digest = manifest.get("image_digest")
        if not isinstance(digest, str):
            return frozenset()
        return frozenset({layer_path(Path(), "image", digest).name})
    found = {str(v) for v in (manifest.get("layers") or {}).values()}
    for archive in (manifest.get("rootfs") or {}).get("archives") or ():
        file = archive.get("file") if isinstance(archive, dict) else None
        if isinstance(file, str) and _DOWNLOAD_RE.match(file):
            found.add(f"{DOWNLOADS}/{file}")
    return frozenset(found)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest, read without touching its atime where the kernel lets us."""
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
        except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- I/O: who uses what --------------------------------------------------------------


def processes_using(cache_dir: Path, proc: Path = Path("/proc")) -> dict[str, set[int]]:
    """Entries some process has mapped (a clone's guest RAM) or open (its disk's
    backing file): entry name -> pids. Blocking; reads every process's maps and fds."""
    roots = {str(cache_dir.absolute()), str(cache_dir.resolve())}
    found: dict[str, set[int]] = {}
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        for path in _paths_of(pid_dir):
            for root in roots:
                if path.startswith(root + "/"):
                    name = entry_of(path[len(root) + 1 :])
                    if name is not None:
                        found.setdefault(name, set()).add(int(pid_dir.name))
    return found


def _paths_of(pid_dir: Path) -> Iterator[str]:
    with contextlib.suppress(OSError):
        for line in (pid_dir / "maps").read_text(errors="replace").splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                yield fields[5].removesuffix(" (deleted)")
    with contextlib.suppress(OSError):
        for fd in (pid_dir / "fd").iterdir():
            with contextlib.suppress(OSError):
                yield os.readlink(fd).removesuffix(" (deleted)")


# --- I/O: removing -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    removed: tuple[Entry, ...]
    held: tuple[Entry, ...]
    """Left because a build held them when gc came to them."""
    failed: tuple[tuple[Entry, str], ...]

    @property
    def reclaimed(self) -> int:
        return freed(self.removed)


def remove(
    cache_dir: Path, doomed: Iterable[Entry], report: Callable[[Entry], None]
) -> Outcome:
    """Remove ``doomed`` entries one by one (blocking); one failing stops none of the rest.

    Each is first moved aside under its exclusive lock (`runner.images.cache.detach`),
    so an entry a build holds is skipped, and a build starting now finds it gone.
    ``report`` is called for each entry removed.
    """
    removed: list[Entry] = []
    held: list[Entry] = []
    failed: list[tuple[Entry, str]] = []
    for entry in doomed:
        path = cache_dir / entry.name
        try:
            aside = detach(path)
            if aside is None:
                if path.exists():
                    held.append(entry)
                continue
            shutil.rmtree(aside)
        except OSError as exc:
            failed.append((entry, str(exc)))
            continue
        removed.append(entry)
        report(entry)
    return Outcome(tuple(removed), tuple(held), tuple(failed))
