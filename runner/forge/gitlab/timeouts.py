"""A GitLab job's time limits as gitlab-runner keeps them. Pure.

GitLab sends the job's timeout (and sets every step's to it); the runner adds
``after_script``'s own limit (``RUNNER_AFTER_SCRIPT_TIMEOUT``, Go durations such
as ``5m``) and prints timeouts the way Go prints a duration. The job script
(`runner.forge.gitlab.script`) enforces the job's limit itself; the host's
deadline (`host_deadline_s`) is only for a script that hangs.
"""

from __future__ import annotations

import math
import re

from runner.forge.gitlab.payload import JobPayload

AFTER_SCRIPT_TIMEOUT_S = 300
"""gitlab-runner's ``after_script`` timeout unless ``RUNNER_AFTER_SCRIPT_TIMEOUT`` says."""
ARCHIVE_GRACE_S = 120
"""Host-side time on top of the job's and after_script's for caches and artifacts."""
_GO_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> int | None:
    """Whole seconds (rounded up) from a Go duration (``5m``, ``1h30m``, ``90s``) or a
    number of seconds, as timeout variables give them; ``None`` if it is neither."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if not _GO_DURATION.fullmatch(text):
        return None
    seconds = sum(float(n) * _GO_UNIT[unit] for n, unit in _GO_PART.findall(text))
    return max(1, math.ceil(seconds))


def go_duration(seconds: int) -> str:
    """``seconds`` as Go prints a duration (``3s``, ``5m0s``, ``1h0m0s``), as
    gitlab-runner names a job timeout."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def timeout_variable(job: JobPayload, name: str) -> tuple[int | None, str | None]:
    """A timeout variable's seconds (``None``: unset or unusable) and a warning if unusable."""
    value = job.variable(name)
    if not value:
        return None, None
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        return None, f'WARNING: {name}="{value}" is not a duration (like 5m or 300); ignored'
    return seconds, None


def after_script_timeout(job: JobPayload) -> int:
    """``after_script``'s own time limit: ``RUNNER_AFTER_SCRIPT_TIMEOUT``, else
    `AFTER_SCRIPT_TIMEOUT_S` (GitLab sets the step's ``timeout`` to the job's, so it is
    not used)."""
    return timeout_variable(job, "RUNNER_AFTER_SCRIPT_TIMEOUT")[0] or AFTER_SCRIPT_TIMEOUT_S


def host_deadline_s(job: JobPayload) -> int:
    """How long the host lets the job's VM work run: the job's timeout (which the script
    enforces itself), then after_script's, then `ARCHIVE_GRACE_S` for the archives. It only
    fires when the script itself hangs."""
    return job.timeout_s + after_script_timeout(job) + ARCHIVE_GRACE_S
