"""GitLab job caches on the host: one directory per project, one zip per cache key.

``<root>/<project id>/<key>.zip``, as gitlab-runner's local cache keeps them
(no distributed cache). The root and each project directory are 0700 and
the zips 0600: a cache holds a private project's files. A job sees only its
own project's caches. Writes are atomic (a temp file renamed over the old
zip), so a job reading a key never gets half of another job's write. Caches
over `MAX_BYTES` are not kept (the job is told), as they travel through
the daemon's memory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from runner.private_file import write_private

MAX_BYTES = 512 * 1024 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ProjectCaches:
    """The caches of one project under ``root`` (blocking file I/O: call in a thread)."""

    def __init__(self, root: Path, project_id: int) -> None:
        self.root = root
        self.directory = root / str(project_id)

    def path(self, key: str) -> Path:
        """Where ``key`` is kept: readable names, and a hash so two keys never collide."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.directory / f"{_SAFE.sub('_', key)[:80]}-{digest}.zip"

    def load(self, keys: list[str]) -> tuple[str, bytes] | None:
        """The first of ``keys`` (the key, then its fallbacks) that is kept, with its bytes."""
        for key in keys:
            try:
                return key, self.path(key).read_bytes()
            except FileNotFoundError:
                continue
        return None

    def store(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key``, replacing what was there."""
        if len(data) > MAX_BYTES:
            raise ValueError(f"{len(data)} bytes is over the {MAX_BYTES >> 20} MiB cache limit")
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        write_private(self.path(key), data, parent_mode=0o700)
