"""The GitLab custom executor driven the way gitlab-runner drives it.

A driver runs `config`, `prepare`, `run <script> <stage>` for every stage with
bash scripts shaped like the ones gitlab-runner generates, and `cleanup`, as
separate processes with the CUSTOM_ENV_* and failure-code variables set.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.api.client import ApiClient
from runner.api.local import DaemonClient
from runner.forge import gitlab_executor
from runner.limits import MAX_TIMEOUT_S
from runner.vm.qemu import qemu_processes
from tests.daemons import DaemonProcess

pytestmark = pytest.mark.vm
BUILD_FAILURE, SYSTEM_FAILURE = 31, 32
STAGES = ["prepare_script", "get_sources", "build_script", "after_script", "archive_cache",
          "upload_artifacts_on_success", "cleanup_file_variables"]


class Runner:
    """Plays gitlab-runner for one job."""

    def __init__(self, daemon: DaemonProcess, job_id: int, tmp: Path) -> None:
        self.daemon = daemon
        self.job_id = job_id
        self.tmp = tmp
        self.code_file = tmp / f"exit-code-{job_id}"
        self.env = {
            **os.environ,
            "CUSTOM_ENV_CI_JOB_ID": str(job_id),
            "CUSTOM_ENV_CI_RUNNER_ID": "12",
            "CUSTOM_ENV_CI_SERVER_HOST": "gitlab.example.com",
            "CUSTOM_ENV_CI_PROJECT_PATH": "group/project",
            "BUILD_FAILURE_EXIT_CODE": str(BUILD_FAILURE),
            "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE),
            "BUILD_EXIT_CODE_FILE": str(self.code_file),
        }

    def argv(self, *args: str) -> list[str]:
        # As in gitlab-runner's config.toml: *_exec = snapfleet, *_args = [--config, F,
        # gitlab-executor, step]; gitlab-runner appends <script> <stage> for `run`.
        return [sys.executable, "-m", "runner.cli", "--config", str(self.daemon.config),
                "gitlab-executor", *args]

    def step(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True,
                              timeout=180, check=False)

    def script(self, stage: str, body: str) -> Path:
        """A stage script in the shape gitlab-runner generates for bash."""
        path = self.tmp / f"script-{self.job_id}-{stage}"
        path.write_text(
            "#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n"
            f"export CI_JOB_ID='{self.job_id}'\n"
            "export CI_PROJECT_DIR='/builds/group/project'\n"
            "export DEPLOY_TOKEN='s3cret-from-gitlab'\n"
            'mkdir -p "$CI_PROJECT_DIR" && cd "$CI_PROJECT_DIR"\n'
            f"{body}\n"
        )
        return path

    async def start_run(self, stage: str, body: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *self.argv("run", str(self.script(stage, body)), stage), env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )


def ok(done: subprocess.CompletedProcess[str]) -> None:
    """A step that must succeed; says what it printed when it does not."""
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


NO_HELPER_NEEDED = "[gitlab]\nrequire_helper = false\n"
"""The default image has no gitlab-runner binary; these jobs use no artifacts or caches."""


@pytest.fixture
async def gl_daemon(daemon_factory: object) -> DaemonProcess:
    d: DaemonProcess = daemon_factory(toml=NO_HELPER_NEEDED)  # type: ignore[operator]
    d.start()
    d.wait_for("READY=1")
    return d


BODIES = {
    "prepare_script": 'echo "Running on $(hostname) via Snapfleet"',
    "get_sources": ("git init -q . && echo 'print(\"hello from python\")' > main.py && "
                    "git add . && git -c user.email=ci@x -c user.name=ci commit -qm init && "
                    "echo sources-ready"),
    "build_script": ('echo build-start; python3 main.py; echo "token=$DEPLOY_TOKEN"; '
                     'echo "leaked=$(env | grep -c CUSTOM_ENV_ || true)"; echo to-stderr >&2'),
    "after_script": "echo after",
    "archive_cache": "mkdir -p /cache && tar czf /cache/cache.tgz . && echo cached",
    "upload_artifacts_on_success": "ls main.py",
    "cleanup_file_variables": "echo cleaned",
}


async def test_passing_job_runs_every_stage_in_one_vm(gl_daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    runner = Runner(gl_daemon, 501, tmp_path)
    config = runner.step("config")
    assert config.returncode == 0
    cfg = json.loads(config.stdout)
    assert cfg["builds_dir"] == "/builds"
    assert cfg["builds_dir_is_shared"] is False
    assert cfg["driver"]["name"] == "snapfleet"
    prepare = runner.step("prepare")
    assert prepare.returncode == 0, prepare.stderr
    assert "restored default from snapshot" in prepare.stdout
    hostnames = set()
    outputs = {}
    for stage in STAGES:
        done = runner.step("run", str(runner.script(stage, BODIES[stage])), stage)
        assert done.returncode == 0, (stage, done.stdout, done.stderr)
        outputs[stage] = done.stdout
        if stage == "prepare_script":
            hostnames.add(done.stdout.split()[2])
    assert outputs["get_sources"].endswith("sources-ready\n")
    # One stream, as GitLab's trace is: stderr lines arrive where they were written.
    assert outputs["build_script"] == (
        "build-start\nhello from python\ntoken=s3cret-from-gitlab\nleaked=0\nto-stderr\n"
    )
    assert outputs["archive_cache"] == "cached\n"  # the files of get_sources were still there
    ok(runner.step("cleanup"))
    assert gl_daemon.vm_dirs() == []


async def test_stdout_and_stderr_written_back_to_back_keep_their_order(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    runner = Runner(gl_daemon, 503, tmp_path)
    ok(runner.step("prepare"))
    body = "for i in $(seq 1 20); do echo out-$i; echo err-$i >&2; done"
    done = runner.step("run", str(runner.script("build_script", body)), "build_script")
    ok(done)
    expected = "".join(f"out-{i}\nerr-{i}\n" for i in range(1, 21))
    assert done.stdout == expected
    ok(runner.step("cleanup"))


async def test_failing_script_is_a_build_failure_with_the_real_code(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    runner = Runner(gl_daemon, 502, tmp_path)
    ok(runner.step("prepare"))
    done = runner.step("run", str(runner.script("build_script", "echo failing; exit 3")),
                       "build_script")
    assert done.returncode == BUILD_FAILURE
    assert done.stdout == "failing\n"
    assert runner.code_file.read_text().strip() == "3"
    # The VM survives a failed stage: after_script still runs in it.
    after = runner.step("run", str(runner.script("after_script", "echo after-failure")),
                        "after_script")
    assert after.returncode == 0
    ok(runner.step("cleanup"))
    # The daemon ran the stages through the lease's job: it ended failed, with the
    # stage and its code, and metrics count a failure, not a success.
    async with ApiClient(gl_daemon.api) as api:
        jobs = await api.jobs(limit=50)
    job = next(j for j in jobs if j["name"] == "gl:gitlab.example.com:12:502")
    assert (job["state"], job["exit_code"]) == ("failed", 3)
    assert job["reason"] == "stage build_script: failed, exit code 3"
    samples = await gl_daemon.metrics()
    assert samples['snapfleet_jobs_total{outcome="failed"}'] == 1
    assert samples['snapfleet_jobs_total{outcome="succeeded"}'] == 0


async def test_vm_killed_mid_stage_is_a_system_failure(gl_daemon: DaemonProcess,
                                                       tmp_path: Path) -> None:
    runner = Runner(gl_daemon, 503, tmp_path)
    ok(runner.step("prepare"))
    proc = await runner.start_run("build_script", "echo started; sleep 120")
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"started\n"
    pids = qemu_processes(gl_daemon.state / "vms")
    assert len(pids) == 1
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == SYSTEM_FAILURE
    assert "system failure" in err.decode()
    assert "VMM exited" in err.decode()
    ok(runner.step("cleanup"))
    assert gl_daemon.vm_dirs() == []


async def test_sigterm_stops_a_long_stage_within_5s_and_cleanup_leaves_nothing(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    runner = Runner(gl_daemon, 504, tmp_path)
    ok(runner.step("prepare"))
    proc = await runner.start_run("build_script", "echo started; sleep 300; echo never")
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"started\n"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert time.monotonic() - started < 5
    assert b"never" not in out
    assert proc.returncode != 0
    ok(runner.step("cleanup"))
    async with ApiClient(gl_daemon.api) as api:
        status = await api.status()
    assert status["vms"] == []
    assert status["leases"] == []
    assert gl_daemon.vm_dirs() == []


async def test_two_jobs_at_once_get_two_vms(gl_daemon: DaemonProcess, tmp_path: Path) -> None:
    a, b = Runner(gl_daemon, 505, tmp_path), Runner(gl_daemon, 506, tmp_path)
    prepared = await asyncio.gather(*(asyncio.to_thread(r.step, "prepare") for r in (a, b)))
    assert all(p.returncode == 0 for p in prepared)
    vm_ids = {p.stdout.split("(vm ")[1].rstrip(")\n") for p in prepared}
    assert len(vm_ids) == 2
    write = a.step("run", str(a.script("build_script", "echo a > /builds/marker-a; hostname")),
                   "build_script")
    look = b.step("run", str(b.script("build_script", "test ! -e /builds/marker-a && hostname")),
                  "build_script")
    assert write.returncode == 0
    assert look.returncode == 0, look.stdout
    assert write.stdout != look.stdout  # different hostnames: different VMs
    for r in (a, b):
        ok(r.step("cleanup"))


async def test_a_prepare_waiting_for_a_slot_says_it_is_queued_and_why(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d: DaemonProcess = daemon_factory(concurrency="1")
    d.start()
    d.wait_for("READY=1")
    first, second = Runner(d, 507, tmp_path), Runner(d, 508, tmp_path)
    ok(first.step("prepare"))
    waiting = await asyncio.create_subprocess_exec(
        *second.argv("prepare"), env=second.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert waiting.stdout is not None
    await waiting.stdout.readline()  # "restoring a fresh microVM"
    line = await asyncio.wait_for(waiting.stdout.readline(), timeout=30)
    assert line.decode() == (
        "Snapfleet: queued for a default VM: every job slot is busy"
        " (capacity.max_concurrency)\n"
    )
    ok(first.step("cleanup"))  # its slot frees: the waiting prepare gets a VM
    out, err = await asyncio.wait_for(waiting.communicate(), timeout=120)
    assert waiting.returncode == 0, err
    assert b"restored default from snapshot" in out
    ok(second.step("cleanup"))
    assert d.stop() == 0


HELPER_PROFILES = """
[gitlab]
allowed_profiles = ["default", "gl"]
[profiles.default]
[profiles.gl]
image = "gitlab-runner"
[profiles.other]
"""


async def test_config_fails_at_once_when_the_image_lacks_the_gitlab_runner_helper(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d: DaemonProcess = daemon_factory(toml=HELPER_PROFILES)
    d.start()
    d.wait_for("READY=1")
    runner = Runner(d, 510, tmp_path)
    done = runner.step("config")
    assert (done.returncode, done.stdout) == (SYSTEM_FAILURE, "")
    [line] = done.stderr.splitlines()
    assert line.startswith("Snapfleet: system failure: profile 'default' runs image 'default',"
                           " which has no gitlab-runner helper"), line
    for way_out in ("snapfleet image build gitlab-runner", 'image = "gitlab-runner"',
                    "[gitlab] require_helper = false"):
        assert way_out in line

    # A profile whose image's recipe installs the helper passes, with no image built.
    runner.env["CUSTOM_ENV_SNAPFLEET_PROFILE"] = "gl"
    done = runner.step("config")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["driver"]["name"] == "snapfleet"

    # The daemon decides, and says every problem.
    client = DaemonClient(d.api)
    assert client.check_lease("gl") == {"profile": "gl", "image": "gitlab-runner",
                                        "problems": []}
    other = client.check_lease("other")
    assert (other["profile"], other["image"]) == ("other", "default")
    assert other["problems"][0] == ("profile 'other' is not allowed for GitLab jobs"
                                    " (allowed: ['default', 'gl'])")
    assert "has no gitlab-runner helper" in other["problems"][1]
    runner.env["CUSTOM_ENV_SNAPFLEET_PROFILE"] = "other"
    done = runner.step("config")
    assert done.returncode == SYSTEM_FAILURE
    assert "profile 'other' is not allowed for GitLab jobs" in done.stderr
    # Checking asked for no VM.
    async with ApiClient(d.api) as api:
        assert await api.jobs() == []
    assert d.vm_dirs() == []


async def test_config_passes_without_the_helper_when_not_required(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    done = Runner(gl_daemon, 511, tmp_path).step("config")
    assert done.returncode == 0, done.stderr
    assert DaemonClient(gl_daemon.api).check_lease(None) == {
        "profile": "default", "image": "default", "problems": []}


def test_config_without_a_daemon_is_a_system_failure(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(f'[daemon]\napi_socket = "{tmp_path}/none.sock"\n')
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("snapfleet_")}
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--config", str(tmp_path / "config.toml"),
         "gitlab-executor", "config"],
        env={**env, "SYSTEM_FAILURE_EXIT_CODE": str(SYSTEM_FAILURE)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (done.returncode, done.stdout) == (SYSTEM_FAILURE, "")
    assert done.stderr.startswith("Snapfleet: system failure: cannot check the job's profile:"
                                  " cannot reach the daemon at ")


async def test_cleanup_without_prepare_and_twice_is_harmless(gl_daemon: DaemonProcess,
                                                             tmp_path: Path) -> None:
    runner = Runner(gl_daemon, 507, tmp_path)
    ok(runner.step("cleanup"))
    ok(runner.step("prepare"))
    ok(runner.step("cleanup"))
    ok(runner.step("cleanup"))
    stage = runner.step("run", str(runner.script("build_script", "true")), "build_script")
    assert stage.returncode == SYSTEM_FAILURE
    assert "was prepare run?" in stage.stderr


async def test_disallowed_profile_is_a_system_failure(gl_daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    runner = Runner(gl_daemon, 508, tmp_path)
    runner.env["CUSTOM_ENV_SNAPFLEET_PROFILE"] = "gpu"
    done = runner.step("prepare")
    assert done.returncode == SYSTEM_FAILURE
    assert "profile 'gpu' is not allowed for GitLab jobs" in done.stderr


async def test_a_stage_the_agent_cannot_take_is_a_build_failure_and_the_vm_lives_on(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    runner = Runner(gl_daemon, 509, tmp_path)
    ok(runner.step("prepare"))
    for stage, body, reason in [
        ("build_script", "echo nul\x00byte", "script: Value error, must not contain a NUL byte"),
        ("after_script", "echo " + "x" * (2 << 20), "the limit is 983040 bytes"),
    ]:
        done = runner.step("run", str(runner.script(stage, body)), stage)
        assert done.returncode == BUILD_FAILURE, (stage, done.stderr)
        assert done.stderr.startswith(f"Snapfleet: job refused: stage {stage}: ")
        assert reason in done.stderr
        assert "Traceback" not in done.stderr
    after = runner.step("run", str(runner.script("after_script", "echo still-here")),
                        "after_script")
    assert after.stdout == "still-here\n", after.stderr
    ok(runner.step("cleanup"))
    assert "Traceback" not in gl_daemon.log()


async def test_the_vm_lives_as_long_as_the_gitlab_job_may(
    gl_daemon: DaemonProcess, tmp_path: Path
) -> None:
    assert gitlab_executor.MAX_VM_S == MAX_TIMEOUT_S
    runner = Runner(gl_daemon, 512, tmp_path)
    runner.env["CUSTOM_ENV_CI_JOB_TIMEOUT"] = "7200"  # the profile's own timeout is 3600
    prepare = runner.step("prepare")
    ok(prepare)
    assert "limit" not in prepare.stdout
    async with ApiClient(gl_daemon.api) as api:
        (job,) = [j for j in await api.jobs() if j["state"] == "running"]
    assert job["timeout_s"] == 7200 + 60  # a minute on top for the stages after the script
    ok(runner.step("cleanup"))

    longer = Runner(gl_daemon, 513, tmp_path)
    longer.env["CUSTOM_ENV_CI_JOB_TIMEOUT"] = str(30 * 86400)
    prepare = longer.step("prepare")
    ok(prepare)
    assert "beyond Snapfleet's limit; its VM lives at most 604800 s" in prepare.stdout
    async with ApiClient(gl_daemon.api) as api:
        (job,) = [j for j in await api.jobs() if j["state"] == "running"]
    assert job["timeout_s"] == MAX_TIMEOUT_S
    ok(longer.step("cleanup"))
