"""gitlab-runner custom executor: `snapfleet gitlab-executor config|prepare|run|cleanup`.

gitlab-runner starts one process per step; the VM lives in the daemon between
them as a lease keyed by the job's identity (GitLab host, runner id, job id).
The contract (gitlab-runner's docs/executors/custom.md):

* job variables arrive as ``CUSTOM_ENV_*``; the stage scripts gitlab-runner
  generates already carry them, so they are not re-exported here;
* a failing script exits ``$BUILD_FAILURE_EXIT_CODE`` (the real code goes to
  ``$BUILD_EXIT_CODE_FILE`` when set); a Snapfleet or VM problem exits
  ``$SYSTEM_FAILURE_EXIT_CODE`` with a one-line reason;
* SIGTERM (cancel, timeout) must stop the stage promptly; cleanup always runs.

Each step is a fresh process, so start-up is most of a short step's time: the
steps import the standard library, `runner.errors` and the blocking
`runner.api.local` client only (no event loop, no pydantic, no aiohttp), which
`tests/test_cli_imports.py` holds them to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from runner import __version__
from runner.api.local import DaemonClient
from runner.error_root import ConfigError, SnapfleetError

if TYPE_CHECKING:
    from runner.cli.client_settings import ClientSettings

DRIVER = "snapfleet"
MAX_SCRIPT_FRAME = (1 << 20) - 64 * 1024
"""`runner.limits.MAX_JOB_BYTES`, not imported from there (it costs pydantic); a test
holds them equal."""

MAX_VM_S = 7 * 86400.0
"""`runner.limits.MAX_TIMEOUT_S`, the longest a lease may live (not imported from there:
pydantic would double a stage's start-up)."""


class ExecutorEnv:
    """What gitlab-runner tells a step through its environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.build_failure = int(environ.get("BUILD_FAILURE_EXIT_CODE", "1"))
        self.system_failure = int(environ.get("SYSTEM_FAILURE_EXIT_CODE", "2"))
        self.exit_code_file = environ.get("BUILD_EXIT_CODE_FILE")
        self.profile = environ.get("CUSTOM_ENV_SNAPFLEET_PROFILE") or None
        self.job_timeout = _seconds(environ.get("CUSTOM_ENV_CI_JOB_TIMEOUT"))

    def lease_key(self) -> str:
        """The job's identity: never shared between jobs, stable across its steps."""
        job = self.environ.get("CUSTOM_ENV_CI_JOB_ID")
        runner = (self.environ.get("CUSTOM_ENV_CI_RUNNER_ID")
                  or self.environ.get("CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN"))
        if not job or not runner:
            raise SnapfleetError(
                "CUSTOM_ENV_CI_JOB_ID and CUSTOM_ENV_CI_RUNNER_ID are not set: not run by"
                " gitlab-runner's custom executor?"
            )
        host = self.environ.get("CUSTOM_ENV_CI_SERVER_HOST", "gitlab")
        return re.sub(r"[^A-Za-z0-9_.:-]", "_", f"gl:{host}:{runner}:{job}")[:128]


def config_output(settings: ClientSettings) -> dict[str, object]:
    """The JSON `config_exec` prints for gitlab-runner."""
    return {
        "builds_dir": settings.builds_dir,
        "cache_dir": settings.cache_dir,
        "builds_dir_is_shared": False,
        "hostname": f"snapfleet-{socket.gethostname()}",
        "driver": {"name": DRIVER, "version": __version__},
        "job_env": {"SNAPFLEET": "1"},
    }


def config(settings: ClientSettings, env: ExecutorEnv) -> int:
    """Print the executor's config, once the daemon says the job's profile can serve it
    (allowed, and its image has the gitlab-runner helper the stages call)."""
    try:
        found = DaemonClient(settings.api_socket).check_lease(env.profile)
    except SnapfleetError as exc:
        return _system_failure(env, f"cannot check the job's profile: {exc}")
    problems = found.get("problems")
    if problems:
        return _system_failure(env, "; ".join(str(p) for p in problems))
    print(json.dumps(config_output(settings)))
    return 0


def prepare(settings: ClientSettings, env: ExecutorEnv) -> int:
    try:
        key = env.lease_key()
        profile = env.profile or settings.default_profile
        print(f"Snapfleet: restoring a fresh microVM (profile {profile})", flush=True)
        # The VM lives as long as the GitLab job may (not the profile's timeout),
        # with a minute on top for the stages after the script.
        timeout = None if env.job_timeout is None else env.job_timeout + 60
        if timeout is not None and timeout > MAX_VM_S:
            print(f"Snapfleet: the job's timeout ({env.job_timeout:g} s) is beyond Snapfleet's"
                  f" limit; its VM lives at most {MAX_VM_S:g} s", flush=True)
            timeout = MAX_VM_S
        lease = DaemonClient(settings.api_socket).acquire_lease(
            key, env.profile, timeout, on_wait=_Waiting(profile).tell
        )
    except SnapfleetError as exc:
        return _system_failure(env, f"cannot prepare a VM: {exc}")
    warm = " from the warm pool" if lease["warm"] else ""
    print(
        f"Snapfleet: restored {lease['profile']} from snapshot {str(lease['snapshot'])[:12]} in "
        f"{lease['restore_ms']:.0f} ms{warm} (vm {lease['vm_id']})",
        flush=True,
    )
    return 0


class _Waiting:
    """Tells the job's log why its VM is not there yet: when the reason changes, and
    at least every REPEAT_S while it stays the same."""

    REPEAT_S = 30.0

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.last: tuple[str, float] | None = None

    def tell(self, why: str) -> None:
        now = time.monotonic()
        if self.last is not None and self.last[0] == why and now - self.last[1] < self.REPEAT_S:
            return
        self.last = (why, now)
        print(f"Snapfleet: queued for a {self.profile} VM: {why}", flush=True)


def run(settings: ClientSettings, env: ExecutorEnv, script_path: Path, stage: str) -> int:
    try:
        key = env.lease_key()
        script = script_path.read_text()
    except (SnapfleetError, OSError, UnicodeDecodeError) as exc:
        return _system_failure(env, f"stage {stage}: {exc}")
    refusal = script_refusal(script)
    if refusal is not None:  # the job's own script: retrying on another runner won't help
        print(f"Snapfleet: job refused: stage {stage}: {refusal}", file=sys.stderr, flush=True)
        return env.build_failure
    try:
        with _signals_to_fd(signal.SIGTERM, signal.SIGINT) as (cancel_fd, signalled):
            final = DaemonClient(settings.api_socket).exec_in_lease(
                key, script, _write, cancel_fd=cancel_fd, stage=_stage_name(stage)
            )
    except SnapfleetError as exc:
        return _system_failure(env, f"stage {stage}: {exc}")
    if final.get("error"):
        return _system_failure(env, f"stage {stage}: {final['error']}")
    code = int(final["exit"])  # the daemon's exit_code(outcome)
    if code == 0 and not signalled:
        return 0
    if code == 0:
        code = 128 + signal.SIGTERM
    if env.exit_code_file:
        try:
            Path(env.exit_code_file).write_text(f"{code}\n")
        except OSError as exc:
            return _system_failure(env, f"cannot write BUILD_EXIT_CODE_FILE: {exc.strerror}")
    return env.build_failure


def cleanup(settings: ClientSettings, env: ExecutorEnv) -> int:
    """Destroy the job's VM. Never fails the job: a missing VM is already clean, and a
    daemon that is down reclaims orphans itself when it comes back."""
    try:
        key = env.lease_key()
        DaemonClient(settings.api_socket).release_lease(key)
    except SnapfleetError as exc:
        print(f"Snapfleet: cleanup: {exc}", file=sys.stderr)
    return 0


def script_refusal(script: str) -> str | None:
    """Why the agent could not take ``script`` (as `ExecRequest` says it), or None."""
    fits = len(json.dumps({"argv": None, "script": script, "env": {}, "cwd": None},
                          separators=(",", ":"))) <= MAX_SCRIPT_FRAME
    if fits and "\x00" not in script:
        return None  # the common case, decided without importing pydantic
    from runner.service.jobs import ExecRequest

    try:
        ExecRequest.parse({"script": script})
    except ConfigError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _signals_to_fd(*signals: signal.Signals) -> Iterator[tuple[int, list[int]]]:
    """While inside, ``signals`` make the yielded fd readable and are listed (not raised)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda num, _frame: caught.append(num))
                for sig in signals}
    old_fd = signal.set_wakeup_fd(write_fd)
    try:
        yield read_fd, caught
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(read_fd)
        os.close(write_fd)


def _seconds(text: str | None) -> float | None:
    """``CI_JOB_TIMEOUT`` (seconds), or None when unset or not a positive number."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < math.inf else None


def _stage_name(stage: str) -> str | None:
    """gitlab-runner's stage names are short identifiers; anything else goes unnamed."""
    return stage if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", stage) else None


def _system_failure(env: ExecutorEnv, reason: str) -> int:
    print(f"Snapfleet: system failure: {reason}", file=sys.stderr, flush=True)
    return env.system_failure


def _write(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


def main(settings: ClientSettings, action: str, args: list[str]) -> int:
    """Dispatch one gitlab-runner step."""
    env = ExecutorEnv(os.environ)
    if action == "config":
        return config(settings, env)
    if action == "prepare":
        return prepare(settings, env)
    if action == "run":
        if len(args) < 2:
            return _system_failure(env, "run needs <script> <stage>")
        return run(settings, env, Path(args[0]), args[1])
    return cleanup(settings, env)
