"""The webhook source's queued jobs on disk, so a restart does not forget them.

GitHub never redelivers a webhook: a ``queued`` heard just before a restart
(or for an organisation's repository, which no poll covers) would otherwise
be lost with the daemon's memory. The file holds job ids, repositories and
labels only (nothing secret); it is replaced atomically and is 0600.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.private_file import write_private


@dataclass(frozen=True)
class SavedJob:
    """A queued job as remembered across restarts."""

    job_id: int
    repo: str
    labels: tuple[str, ...]
    seen_at: float
    """Wall-clock time it was first heard of."""
    polled: bool


def load(path: Path) -> tuple[list[SavedJob], list[int]]:
    """Queued jobs and recently finished job ids; nothing (not an error) if unreadable."""
    try:
        data = json.loads(path.read_text())
        jobs = [
            SavedJob(int(j["job_id"]), str(j["repo"]), tuple(str(x) for x in j["labels"]),
                     float(j["seen_at"]), bool(j["polled"]))
            for j in data.get("queued", [])
        ]
        finished = [int(i) for i in data.get("finished", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return [], []
    return jobs, finished


def save(path: Path, jobs: list[SavedJob], finished: list[int]) -> None:
    """Replace the file with ``jobs`` and ``finished`` (atomically, mode 0600)."""
    data: dict[str, Any] = {
        "queued": [
            {"job_id": j.job_id, "repo": j.repo, "labels": list(j.labels),
             "seen_at": j.seen_at, "polled": j.polled}
            for j in jobs
        ],
        "finished": finished,
    }
    write_private(path, json.dumps(data))
