"""Where a GitLab job lives in its guest, and how the host's archives get there."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from runner.forge.gitlab.payload import JobPayload

CHUNK = 512 * 1024
"""Archives reach the guest in parts of this size (one agent frame each)."""


@dataclass(frozen=True)
class GuestLayout:
    """Where a job lives in the guest."""

    builds_dir: str = "/builds"
    work_dir: str = "/run/snapfleet-gitlab"
    """Private (0700) scratch: variable files, steps, dependencies, artifacts."""

    def project_dir(self, job: JobPayload) -> str:
        """``<builds_dir>/<namespace>/<project>``, as gitlab-runner lays it out."""
        path = job.variable("CI_PROJECT_PATH") or f"project-{job.job_info.project_id}"
        parts = [p for p in PurePosixPath(path).parts if p not in ("", ".", "..", "/")]
        return str(PurePosixPath(self.builds_dir, *parts))

    def artifact_path(self, index: int) -> str:
        """Where the zip for ``job.artifacts[index]`` is left."""
        return f"{self.work_dir}/artifacts/{index}.zip"

    def dependency_dir(self) -> str:
        """Where the host puts dependency archives (see `guest_parts`)."""
        return f"{self.work_dir}/deps"

    def cache_in_dir(self) -> str:
        """Where the host puts the cache archives to restore (see `guest_parts`)."""
        return f"{self.work_dir}/cache-in"

    def cache_path(self, index: int) -> str:
        """Where the zip for ``job.cache[index]`` is left, to keep on the host."""
        return f"{self.work_dir}/caches/{index}.zip"


def guest_parts(directory: str, archives: Iterable[tuple[int, bytes]]) -> list[tuple[str, bytes]]:
    """``(guest path, bytes)`` parts to ``put_file`` for archives (dependencies' artifacts
    by dependency id, caches by index) into ``directory``.

    Each archive is split into `CHUNK`-sized parts named ``<n>.zip.part<NNNNN>``
    that the script joins and extracts, so any size passes the agent's frame limit.
    """
    files = []
    for name, data in archives:
        for n, start in enumerate(range(0, max(len(data), 1), CHUNK)):
            files.append((f"{directory}/{name}.zip.part{n:05d}", data[start : start + CHUNK]))
    return files
