"""The job script's result, read back on the host, and what GitLab is told of it.

The script (`runner.forge.gitlab.script`) ends by writing one line starting
with `RESULT_MARK` on its original stderr; `ResultReader` picks it out of the
stream and `outcome` turns it, with how the exec ended, into a `JobOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.forge.gitlab.session import JobOutcome

RESULT_MARK = b"snapfleet-gitlab-result "


@dataclass(frozen=True)
class ScriptResult:
    """The script's own account of the job (its last line on fd 3)."""

    status: str
    """``success``, ``failed`` or ``canceled``."""
    exit_code: int
    step: str | None
    """The step that failed the job (``get_sources``, ``script``, …)."""
    timed_out: bool
    """That step hit its own timeout."""
    artifacts: tuple[int, ...]
    """Indexes into ``job.artifacts`` whose zip was written (`GuestLayout.artifact_path`)."""
    caches: tuple[int, ...] = ()
    """Indexes into ``job.cache`` whose zip was written (`GuestLayout.cache_path`)."""

    @classmethod
    def parse(cls, line: bytes) -> ScriptResult | None:
        """The result from one line, or ``None`` if it is not a (valid) result line."""
        if not line.startswith(RESULT_MARK):
            return None
        fields = dict(
            item.partition("=")[::2]
            for item in line[len(RESULT_MARK):].decode(errors="replace").split()
        )
        try:
            arts, caches = fields.get("artifacts", "-"), fields.get("caches", "-")
            return cls(
                status=fields["status"],
                exit_code=int(fields["exit_code"]),
                step=None if fields.get("step", "-") == "-" else fields["step"],
                timed_out=fields.get("timed_out") == "1",
                artifacts=() if arts == "-" else tuple(int(a) for a in arts.split(",")),
                caches=() if caches == "-" else tuple(int(c) for c in caches.split(",")),
            )
        except (KeyError, ValueError):
            return None


class ResultReader:
    """Splits the script's stderr: its result line, and anything else (for the trace).

    Only a broken script or agent writes anything else to stderr (the script
    sends all job output to stdout), so that goes to the trace verbatim.
    """

    def __init__(self) -> None:
        self._line = b""
        self.result: ScriptResult | None = None

    def feed(self, data: bytes) -> bytes:
        """Take stderr bytes; return what belongs in the trace."""
        self._line += data
        passthrough = []
        while b"\n" in self._line:
            line, self._line = self._line.split(b"\n", 1)
            parsed = ScriptResult.parse(line)
            if parsed is not None:
                self.result = parsed
            else:
                passthrough.append(line + b"\n")
        if self._line and not RESULT_MARK.startswith(self._line[: len(RESULT_MARK)]):
            passthrough.append(self._line)
            self._line = b""
        return b"".join(passthrough)


def outcome(result: ScriptResult | None, *, timed_out: bool, cancelled: bool) -> JobOutcome:
    """How to report the job, from the script's result and how the exec ended.

    ``timed_out`` / ``cancelled`` come from the agent's ``ExecResult`` (the
    job-level timeout, the host's cancel).
    """
    if timed_out:
        return JobOutcome.failed("job_execution_timeout")
    if cancelled or (result is not None and result.status == "canceled"):
        return JobOutcome.failed("job_canceled")
    if result is None:
        return JobOutcome.failed("runner_system_failure")
    if result.status == "success":
        return JobOutcome.success()
    if result.timed_out:
        return JobOutcome.failed("job_execution_timeout", result.exit_code)
    return JobOutcome.failed("script_failure", result.exit_code)
