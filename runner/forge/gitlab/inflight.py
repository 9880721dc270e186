"""Jobs taken from GitLab and not yet reported finished, on disk, so a crash cannot hide them.

GitLab waits for a taken job until its timeout unless the runner reports it.
If the daemon dies mid-job, the next start must fail it
(``runner_system_failure``) and never run it again. Reporting needs the job's
id, its token (GitLab accepts updates only with it) and the trace GitLab
already holds (the final update carries the trace's checksum). So, per job,
in a 0700 directory under ``paths.runtime_dir`` (tmpfs: the job token must not
reach a disk, and a daemon restart keeps it):

- ``<id>.json``: the id and the job token, 0600, written before the job is
  run and deleted once GitLab accepted the final update; once the job has
  ended, also how (so a final update GitLab did not take before a shutdown
  is sent, with the job's real outcome, at the next start), and how many
  starts failed to report it (the source gives up after a few);
- ``<id>.trace``: the masked trace as produced (0600, appended to as it grows).

The job token is short-lived (GitLab revokes it when the job ends), which is
why keeping it in memory-backed storage for the job's lifetime only,
owner-readable, was preferred to losing the job to GitLab's timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from runner.forge.gitlab.session import JobOutcome
from runner.private_file import write_private
from runner.secret import Secret


@dataclass(frozen=True)
class Orphan:
    """A job a previous run of the daemon took and never reported finished."""

    job_id: int
    token: Secret
    trace: bytes
    taken_at: float
    outcome: JobOutcome | None = None
    """How the job ended, if it did before the daemon stopped."""
    attempts: int = 0
    """Earlier starts that failed to report it."""


class InflightBook:
    """The taken-but-unfinished jobs of one runner (``<runtime_dir>/gitlab/runner-<id>``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _record(self, job_id: int) -> Path:
        return self.root / f"{job_id}.json"

    def _trace(self, job_id: int) -> Path:
        return self.root / f"{job_id}.trace"

    def take(self, job_id: int, token: Secret) -> int:
        """Record a job before running it; returns the fd its trace is appended to."""
        self._write(job_id, token, time.time())
        try:
            return os.open(self._trace(job_id),
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError:
            with contextlib.suppress(OSError):
                self.done(job_id)  # no half-made record: the caller reports the job itself
            raise

    def conclude(self, job_id: int, token: Secret, outcome: JobOutcome) -> None:
        """Record how the job ended, before GitLab is told."""
        try:
            taken_at = float(json.loads(self._record(job_id).read_text())["taken_at"])
        except (OSError, ValueError, TypeError, KeyError):
            taken_at = time.time()
        self._write(job_id, token, taken_at, outcome)

    def attempted(self, orphan: Orphan, attempts: int) -> None:
        """Record that ``attempts`` starts have failed to report ``orphan``."""
        self._write(orphan.job_id, orphan.token, orphan.taken_at, orphan.outcome, attempts)

    def _write(self, job_id: int, token: Secret, taken_at: float,
               outcome: JobOutcome | None = None, attempts: int = 0) -> None:
        body: dict[str, object] = {"id": job_id, "token": token.reveal(), "taken_at": taken_at,
                                   "attempts": attempts}
        if outcome is not None:
            body["outcome"] = {"state": outcome.state, "failure_reason": outcome.failure_reason,
                               "exit_code": outcome.exit_code}
        write_private(self._record(job_id), json.dumps(body), parent_mode=0o700)

    def done(self, job_id: int) -> None:
        """GitLab has the job's final state: forget it (token and trace)."""
        for path in (self._record(job_id), self._trace(job_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def orphans(self) -> list[Orphan]:
        """Jobs left by a previous run (an unreadable record is dropped: nothing to report)."""
        if not self.root.is_dir():
            return []
        found = []
        for record in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(record.read_text())
                job_id, token = int(data["id"]), str(data["token"])
                taken_at = float(data.get("taken_at", 0.0))
                attempts = int(data.get("attempts", 0))
                ended = data.get("outcome")
                outcome = None if ended is None else JobOutcome(
                    str(ended["state"]), ended.get("failure_reason"), ended.get("exit_code"))
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                record.unlink(missing_ok=True)
                continue
            try:
                trace = self._trace(job_id).read_bytes()
            except OSError:
                trace = b""
            found.append(Orphan(job_id, Secret(token), trace, taken_at, outcome, attempts))
        return found
