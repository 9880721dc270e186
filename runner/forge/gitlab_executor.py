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
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from runner import __version__
from runner.api.client import ApiClient
from runner.config import Settings
from runner.errors import ConfigError, SnapfleetError
from runner.execution import EXIT_SYSTEM
from runner.service.jobs import ExecRequest

DRIVER = "snapfleet"


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


def config_output(settings: Settings) -> dict[str, object]:
    """The JSON `config_exec` prints for gitlab-runner."""
    gl = settings.gitlab
    return {
        "builds_dir": gl.builds_dir,
        "cache_dir": gl.cache_dir,
        "builds_dir_is_shared": False,
        "hostname": f"snapfleet-{socket.gethostname()}",
        "driver": {"name": DRIVER, "version": __version__},
        "job_env": {"SNAPFLEET": "1"},
    }


async def config(settings: Settings) -> int:
    print(json.dumps(config_output(settings)))
    return 0


async def prepare(settings: Settings, env: ExecutorEnv) -> int:
    try:
        key = env.lease_key()
        profile = env.profile or settings.default_profile
        print(f"Snapfleet: restoring a fresh microVM (profile {profile})", flush=True)
        async with ApiClient(settings.daemon.api_socket) as api:
            # The VM lives as long as the GitLab job may (not the profile's timeout),
            # with a minute on top for the stages after the script.
            timeout = None if env.job_timeout is None else env.job_timeout + 60
            lease = await api.acquire_lease(key, env.profile, timeout)
    except SnapfleetError as exc:
        return _system_failure(env, f"cannot prepare a VM: {exc}")
    warm = " from the warm pool" if lease["warm"] else ""
    print(
        f"Snapfleet: restored {lease['profile']} from snapshot {str(lease['snapshot'])[:12]} in "
        f"{lease['restore_ms']:.0f} ms{warm} (vm {lease['vm_id']})",
        flush=True,
    )
    return 0


async def run(settings: Settings, env: ExecutorEnv, script_path: Path, stage: str) -> int:
    try:
        key = env.lease_key()
        script = script_path.read_text()
    except (SnapfleetError, OSError, UnicodeDecodeError) as exc:
        return _system_failure(env, f"stage {stage}: {exc}")
    try:
        request = ExecRequest.parse({"script": script})
    except ConfigError as exc:  # the job's own script: retrying on another runner won't help
        print(f"Snapfleet: job refused: stage {stage}: {exc}", file=sys.stderr, flush=True)
        return env.build_failure
    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cancel.set)
    try:
        async with ApiClient(settings.daemon.api_socket) as api:
            final = await api.exec_in_lease(key, request.script, _write, cancel,
                                            stage=_stage_name(stage))
    except SnapfleetError as exc:
        return _system_failure(env, f"stage {stage}: {exc}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if final.get("error"):
        return _system_failure(env, f"stage {stage}: {final['error']}")
    code = int(final.get("exit", EXIT_SYSTEM))  # the daemon's exit_code(outcome)
    if code == 0 and not cancel.is_set():
        return 0
    if code == 0:
        code = 128 + signal.SIGTERM
    if env.exit_code_file:
        try:
            Path(env.exit_code_file).write_text(f"{code}\n")
        except OSError as exc:
            return _system_failure(env, f"cannot write BUILD_EXIT_CODE_FILE: {exc.strerror}")
    return env.build_failure


async def cleanup(settings: Settings, env: ExecutorEnv) -> int:
    """Destroy the job's VM. Never fails the job: a missing VM is already clean, and a
    daemon that is down reclaims orphans itself when it comes back."""
    try:
        key = env.lease_key()
        async with ApiClient(settings.daemon.api_socket) as api:
            await api.release_lease(key)
    except SnapfleetError as exc:
        print(f"Snapfleet: cleanup: {exc}", file=sys.stderr)
    return 0


def _seconds(text: str | None) -> float | None:
    """``CI_JOB_TIMEOUT`` (seconds), or None when unset or not a positive number."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 < value <= 7 * 86400 else None


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


async def main(settings: Settings, action: str, args: list[str]) -> int:
    """Dispatch one gitlab-runner step."""
    env = ExecutorEnv(os.environ)
    if action == "config":
        return await config(settings)
    if action == "prepare":
        return await prepare(settings, env)
    if action == "run":
        if len(args) < 2:
            return _system_failure(env, "run needs <script> <stage>")
        return await run(settings, env, Path(args[0]), args[1])
    return await cleanup(settings, env)
