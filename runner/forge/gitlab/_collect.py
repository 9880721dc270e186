"""Collect a job's artifacts or a cache into a zip, in the guest (stdlib only).

Usage: ``python3 _collect.py <project_dir> <out.zip> <spec-json>`` where the
spec is ``{"paths": [...], "exclude": [...], "untracked": bool, "for"?: "cache"}``.
Paths and excludes are GitLab's globs relative to the project directory (``*``, ``?``,
``[...]`` within a path segment, ``**`` across segments); a matched directory
brings everything under it. ``untracked`` adds what ``git ls-files -o`` lists.
Prints what it found (the job log shows it); exits 3 when nothing matched, 2
on bad input. Entries are relative to the project directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile


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


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: collect <project_dir> <out.zip> <spec-json>")
        return 2
    root, out, raw = argv
    spec = json.loads(raw)
    files = select(root, list(spec.get("paths") or []), list(spec.get("exclude") or []),
                   bool(spec.get("untracked")))
    cache = spec.get("for") == "cache"
    if not files:
        print("WARNING: No files to cache" if cache else "ERROR: No files to upload")
        return 3
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in files:
            archive.write(os.path.join(root, rel), rel)
    print(f"{len(files)} files found to " + ("cache" if cache else "upload as artifacts"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
