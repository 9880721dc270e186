"""Archives a recipe puts into the guest tree: find, fetch, verify, unpack or install.

An archive is a tarball unpacked at its ``dest`` or (``format = "file"``) a
single executable installed as ``dest``. An archive's bytes (its sha256),
never its path or URL, go into the image key: the same tarball moved
elsewhere keeps the cached image, a new one rebuilds it. URLs are downloaded
once into ``<cache_dir>/downloads/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import secrets
import shutil
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Literal

from runner.errors import ImageError
from runner.images.cache import sha256_file
from runner.images.recipe import ENV_PREFIX, Archive, LoadedRecipe
from runner.proc import ProgressFn

DOWNLOADS = "downloads"
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_WEB = ("http://", "https://")

# (path, device, inode, size, mtime_ns) -> sha256: find_image runs per job and
# must not re-hash a 200 MB tarball each time.
_hashes: dict[tuple[str, int, int, int, int], str] = {}


@dataclass(frozen=True)
class ResolvedArchive:
    """An archive ready to unpack: a local file whose sha256 has been checked."""

    dest: str
    sha256: str
    path: Path
    source: str  # as the recipe says it (``env:NAME``), safe to record
    format: Literal["tar", "file"] = "tar"


def resolve_source(archive: Archive, recipe_dir: Path, environ: Mapping[str, str]) -> str | Path:
    """Where ``archive`` comes from: an http(s) URL (str) or a local file (Path).

    ``env:NAME`` reads NAME from ``environ``; a relative path there is taken
    from the current directory, one in the recipe from the recipe dir.
    """
    source, base = archive.source, recipe_dir
    if source.startswith(ENV_PREFIX):
        name = source[len(ENV_PREFIX) :]
        source, base = environ.get(name, "").strip(), Path.cwd()
        if not source:
            raise ImageError(
                f"{name} is not set; {_ask(archive)} (the image {_puts(archive)} {archive.dest})"
            )
        if "://" in source and not source.startswith((*_WEB, "file://")):
            raise ImageError(f"{name} must be a path or an http(s):// or file:// URL")
    if source.startswith(_WEB):
        return source
    if source.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
    path = Path(source)
    return path if path.is_absolute() else base / path


def _ask(archive: Archive) -> str:
    what = archive.hint or (
        "the path or URL of the file" if archive.format == "file"
        else "the path or URL of a .tar.gz archive"
    )
    if archive.source.startswith(ENV_PREFIX):
        return f"set {archive.source[len(ENV_PREFIX) :]} to {what}"
    return f"the recipe's source {archive.source!r} should be {what}"


def _puts(archive: Archive) -> str:
    return "installs it as" if archive.format == "file" else "unpacks it at"


def public_url(url: str) -> str:
    """``url`` without credentials, query or fragment (presigned URLs carry tokens)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def download_path(cache_dir: Path, url: str) -> Path:
    """Where ``url`` is (or will be) downloaded under ``cache_dir``."""
    name = posixpath.basename(urllib.parse.urlsplit(url).path) or "archive"
    return cache_dir / DOWNLOADS / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) (blocking)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def check_archive(archive: Archive, path: Path) -> ResolvedArchive:
    """Hash ``path`` and check it against the recipe's sha256 (blocking)."""
    if not path.is_file():
        what = "file" if archive.format == "file" else "archive"
        raise ImageError(f"{what} for {archive.dest}: {path} does not exist; {_ask(archive)}")
    sha = file_sha256(path)
    if archive.sha256 is not None and sha != archive.sha256:
        raise ImageError(
            f"archive {path} for {archive.dest} has sha256 {sha},"
            f" but the recipe expects {archive.sha256}"
        )
    return ResolvedArchive(archive.dest, sha, path, archive.source, archive.format)


def locate(
    loaded: LoadedRecipe, cache_dir: Path, environ: Mapping[str, str]
) -> tuple[ResolvedArchive, ...] | None:
    """The recipe's archives without fetching anything; None if one is not downloaded yet."""
    found = []
    for archive in loaded.recipe.archives:
        source = resolve_source(archive, loaded.directory, environ)
        path = download_path(cache_dir, source) if isinstance(source, str) else source
        if isinstance(source, str) and not path.is_file():
            return None
        found.append(check_archive(archive, path))
    return tuple(found)


async def fetch(
    loaded: LoadedRecipe, cache_dir: Path, environ: Mapping[str, str], progress: ProgressFn
) -> tuple[ResolvedArchive, ...]:
    """The recipe's archives, downloading URLs into the cache first."""
    found = []
    for archive in loaded.recipe.archives:
        source = resolve_source(archive, loaded.directory, environ)
        if isinstance(source, str):
            path = download_path(cache_dir, source)
            if not path.is_file():
                progress(f"downloading {public_url(source)}")
                await download(source, path)
        else:
            path = source
        progress(f"checking archive {path.name} for {archive.dest}")
        found.append(await asyncio.to_thread(check_archive, archive, path))
    return tuple(found)


async def download(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` to ``dest`` (atomically) in a thread; cancelling stops the thread."""
    stop = threading.Event()
    try:
        await asyncio.to_thread(_download, url, dest, stop, timeout)
    except asyncio.CancelledError:
        stop.set()  # the thread notices at its next chunk and removes its partial file
        raise


def _download(url: str, dest: Path, stop: threading.Event, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(3)}.part")
    try:
        # Only http(s) gets here: resolve_source turns everything else into a Path.
        with urllib.request.urlopen(url, timeout=timeout) as resp, part.open("wb") as out:  # noqa: S310
            while chunk := resp.read(_CHUNK):
                if stop.is_set():
                    return
                out.write(chunk)
        part.rename(dest)
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise ImageError(f"cannot download {public_url(url)}: {reason}") from exc
    finally:
        part.unlink(missing_ok=True)


def check_members(members: Iterable[tarfile.TarInfo]) -> None:
    """Refuse members that would land outside the destination (pure).

    Absolute names, ``..`` components, and links pointing at absolute paths
    or out of the tree: a later member written through such a link would
    land on the host.
    """
    for m in members:
        name = m.name
        if name.startswith("/") or ".." in name.split("/"):
            raise ImageError(f"archive member {name!r} would be written outside its destination")
        if m.issym() or m.islnk():
            target = m.linkname
            base = posixpath.dirname(name) if m.issym() else ""
            resolved = posixpath.normpath(posixpath.join(base, target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise ImageError(f"archive member {name!r} links outside its destination")


def _guest_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # The stdlib's "data" filter (no devices, no setuid, no escaping links),
    # then root-owned with build-independent directory modes.
    safe = tarfile.data_filter(member, dest)
    mode = 0o755 if safe.isdir() else safe.mode
    return safe.replace(uid=0, gid=0, uname="root", gname="root", mode=mode, deep=False)


def put(archive: ResolvedArchive, root: Path) -> None:
    """Put ``archive`` into the staged guest tree ``root`` as its format says (blocking)."""
    if archive.format == "file":
        install_file(archive.path, root, archive.dest)
    else:
        unpack(archive.path, root, archive.dest)


def install_file(source: Path, root: Path, dest: str) -> None:
    """Copy the single file ``source`` into ``root`` (a staged guest tree) as guest path
    ``dest``: root-owned, mode 0755, replacing a regular file there.

    Blocking: call via a thread. Raises ``ImageError`` when ``dest`` leads out of
    ``root`` through a symlink in the tree or is a directory or symlink there.
    """
    target = root / dest.lstrip("/")
    parent = target.parent
    if not parent.resolve().is_relative_to(root.resolve()):
        raise ImageError(f"file destination {dest} leads out of the guest tree (a symlink?)")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ImageError(f"file destination {dest} is a directory or symlink in the guest tree")
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        os.chown(target, 0, 0)
        target.chmod(0o755)
    except OSError as exc:
        raise ImageError(f"cannot install {source.name} as {dest}: {exc}") from exc


def unpack(archive: Path, root: Path, dest: str) -> None:
    """Unpack ``archive`` into ``root`` (a staged guest tree) at guest path ``dest``.

    Blocking: call via a thread. Raises ``ImageError`` for an unreadable
    archive, a member that would escape ``dest``, or a ``dest`` that leads
    out of ``root`` through a symlink in the tree.
    """
    target = root / dest.lstrip("/")
    if not target.resolve().is_relative_to(root.resolve()):
        raise ImageError(f"archive destination {dest} leads out of the guest tree (a symlink?)")
    try:
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            check_members(members)
            # Checked above and filtered per member.
            tar.extractall(  # noqa: S202
                target, members=members, numeric_owner=True, filter=_guest_filter
            )
    except tarfile.ReadError as exc:
        raise ImageError(f"{archive} is not a tar archive (.tar, .tar.gz, .tgz): {exc}") from exc
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"cannot unpack {archive.name} into {dest}: {exc}") from exc
