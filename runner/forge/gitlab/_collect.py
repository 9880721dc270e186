"""Collect a job's artifacts or a cache into one archive, in the guest (stdlib only).

Usage: ``python3 _collect.py <project_dir> <out> <spec-json>`` where the spec is
``{"paths": [...], "exclude": [...], "untracked": bool, "format"?: "zip" | "gzip" |
"raw", "for"?: "cache"}``. The formats are GitLab's ``artifact_format``, made as
gitlab-runner makes them: ``zip`` (the default) one zip of every file; ``gzip`` one
gzip member per file, concatenated, each header naming the file (FNAME its base
name, FCOMMENT its path), which GitLab reads report by report; ``raw`` the one
matched file as it is (a second file is an error: GitLab takes one).
Paths and excludes are GitLab's globs relative to the project directory (``*``, ``?``,
``[...]`` within a path segment, ``**`` across segments); a matched directory
brings everything under it. ``untracked`` adds what ``git ls-files -o`` lists.
Prints what it found (the job log shows it); exits 3 when nothing matched, 2
on bad input, 4 when the files cannot be archived so (more than one for
``raw``, a file unreadable). Entries are relative to the project directory.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from typing import BinaryIO

FORMATS = ("zip", "gzip", "raw")
_BLOCK = 1 << 20


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A doublestar glob as a regex over ``/``-separated relative paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "$")


def _normalize(pattern: str) -> str | None:
    """The pattern relative to the project, or ``None`` if it points outside it."""
    text = pattern.strip()
    if not text or text.startswith("/"):
        return None
    norm = os.path.normpath(text).replace(os.sep, "/")
    if norm == ".." or norm.startswith("../"):
        return None
    return "" if norm == "." else norm


def _tree(root: str) -> list[tuple[str, bool]]:
    """Every path under ``root`` (relative, ``/``-separated) and whether it is a dir."""
    found: list[tuple[str, bool]] = []
    for here, dirs, files in os.walk(root):
        rel = os.path.relpath(here, root).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        if rel == "":
            dirs[:] = [d for d in dirs if d != ".git"]
        found.extend((rel + d, True) for d in dirs)
        found.extend((rel + f, False) for f in files)
    return found


def _under(path: str, dirs: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:n]) in dirs for n in range(1, len(parts)))


def select(root: str, paths: list[str], exclude: list[str], untracked: bool) -> list[str]:
    """The files to archive, sorted."""
    tree = _tree(root)
    chosen_files: set[str] = set()
    chosen_dirs: set[str] = set()
    for pattern in paths:
        norm = _normalize(pattern)
        if norm is None:
            print(f"WARNING: {pattern}: not inside the project directory; ignored")
            continue
        if norm == "":
            chosen_dirs.add("")
            continue
        regex = glob_regex(norm)
        hits = [(p, is_dir) for p, is_dir in tree if regex.match(p)]
        if not hits:
            print(f"WARNING: {pattern}: no matching files. Ensure that the path"
                  " is relative to the working directory")
        for p, is_dir in hits:
            (chosen_dirs if is_dir else chosen_files).add(p)
    if untracked:
        listed = subprocess.run(["git", "-C", root, "ls-files", "-o", "-z"],
                                capture_output=True, check=False)
        chosen_files.update(p for p in listed.stdout.decode(errors="replace").split("\0") if p)
    files = {p for p, is_dir in tree if not is_dir and ("" in chosen_dirs
                                                        or _under(p, chosen_dirs))}
    files |= chosen_files
    excludes = [glob_regex(n) for n in map(_normalize, exclude) if n]
    excluded_dirs = {p for p, is_dir in tree if is_dir and any(r.match(p) for r in excludes)}
    return sorted(
        p for p in files
        if not any(r.match(p) for r in excludes) and not _under(p, excluded_dirs)
        and os.path.isfile(os.path.join(root, p)) and not os.path.islink(os.path.join(root, p))
    )


def write_zip(root: str, files: list[str], out: str) -> None:
    """Every file in one zip, entries named by their path in the project."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in files:
            archive.write(os.path.join(root, rel), rel)


def _header_text(text: str) -> bytes:
    # RFC 1952 header strings are ISO 8859-1, zero-terminated (a path has no NUL).
    return text.encode("latin-1", errors="replace") + b"\0"


def write_gzip_member(out: BinaryIO, path: str, rel: str) -> None:
    """Append one gzip member holding ``path`` to the binary file ``out`` (RFC 1952)."""
    write = out.write
    mtime = int(os.stat(path).st_mtime) & 0xFFFFFFFF
    fname, fcomment = 0x08, 0x10
    write(b"\x1f\x8b\x08" + bytes([fname | fcomment]) + struct.pack("<I", mtime)
          + b"\x00\x03")  # no extra flags; OS = Unix
    write(_header_text(os.path.basename(rel)) + _header_text(rel))
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc, size = 0, 0
    with open(path, "rb") as src:
        while block := src.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
            write(deflate.compress(block))
    write(deflate.flush() + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def write_gzip(root: str, files: list[str], out: str) -> None:
    """One gzip member per file, concatenated, in the order given."""
    with open(out, "wb") as dest:
        for rel in files:
            write_gzip_member(dest, os.path.join(root, rel), rel)


def write_raw(root: str, files: list[str], out: str) -> None:
    """The one file, byte for byte."""
    if len(files) > 1:
        raise ValueError(f"only one file can be sent as raw, {len(files)} matched: "
                         + ", ".join(files[:5]) + (", ..." if len(files) > 5 else ""))
    with open(os.path.join(root, files[0]), "rb") as src, open(out, "wb") as dest:
        while block := src.read(_BLOCK):
            dest.write(block)


WRITERS = {"zip": write_zip, "gzip": write_gzip, "raw": write_raw}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: collect <project_dir> <out> <spec-json>")
        return 2
    root, out, raw = argv
    spec = json.loads(raw)
    fmt = spec.get("format") or "zip"
    if fmt not in FORMATS:
        print(f"ERROR: artifact format {fmt!r} is not one of {', '.join(FORMATS)}")
        return 2
    files = select(root, list(spec.get("paths") or []), list(spec.get("exclude") or []),
                   bool(spec.get("untracked")))
    cache = spec.get("for") == "cache"
    if not files:
        print("WARNING: No files to cache" if cache else "ERROR: No files to upload")
        return 3
    try:
        WRITERS[fmt](root, files, out)
    except (OSError, ValueError) as exc:
        print(f"ERROR: {exc}")
        if os.path.exists(out):
            os.unlink(out)
        return 4
    print(f"{len(files)} files found to " + ("cache" if cache else "upload as artifacts"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
