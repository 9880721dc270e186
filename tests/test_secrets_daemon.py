"""Secrets at rest with a real daemon, its API, its CLI and real VMs.

A job's secret canary reaches the job (it can print it), and otherwise appears
in no file under the state dir (database, WAL, job logs, VM dirs), no line of
the daemon's log and no QEMU argv. Its plain env leaves the state dir when it
ends. A queued job whose secrets a restart took ends with the reason.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner.api.client import ApiClient
from runner.service.recovery import SECRETS_LOST_REASON
from runner.vm.qemu import qemu_processes
from tests.daemons import DaemonProcess, wait_state, wait_terminal
from tests.test_secrets_at_rest import canary, files_holding


def qemu_argv_holding(state: Path, needle: str) -> list[int]:
    pids = []
    for pid in qemu_processes(state / "vms").values():
        try:
            if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


async def output(api: ApiClient, job_id: str) -> bytes:
    return b"".join([chunk async for chunk in api.logs(job_id)])


async def wait_output(api: ApiClient, job_id: str, text: bytes, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in await output(api, job_id):
        assert time.monotonic() < deadline, f"job {job_id} never printed {text!r}"
        await asyncio.sleep(0.2)


# Each job proves its env arrived by printing the canary's tail (not the canary), holds
# its VM a while (so the live VM and QEMU can be searched), then maybe prints it whole.
SCRIPT = (
    'echo "got ${S#sf-canary-secret-} ${P#sf-canary-plain-}"; sleep 4;'
    ' if [ -n "$PRINT" ]; then echo "raw $S"; fi'
)


async def test_a_jobs_secret_is_only_in_its_own_output(daemon: DaemonProcess) -> None:
    d = daemon
    api_secret, api_plain = canary("secret"), canary("plain")
    cli_secret, cli_plain = canary("secret"), canary("plain")
    cli = [sys.executable, "-m", "runner.cli", "--config", str(d.config)]
    async with ApiClient(d.api) as api:
        api_job = (await api.submit(
            {"script": SCRIPT, "env": {"P": api_plain, "PRINT": "1"}},
            secret_env={"S": api_secret},
        ))["id"]
        submitted = await asyncio.to_thread(
            subprocess.run, [*cli, "submit", "--env", "S", "--env", f"P={cli_plain}"],
            input=f"script = '{SCRIPT}'\n", env={**os.environ, "S": cli_secret},
            capture_output=True, text=True, timeout=60, check=True,
        )
        cli_job = submitted.stdout.strip()
        assert (await api.job(cli_job))["secret_env_keys"] == ["S"]
        assert (await api.job(cli_job))["env_keys"] == ["P"]

        for job_id, secret, plain in ((api_job, api_secret, api_plain),
                                      (cli_job, cli_secret, cli_plain)):
            tail = f"got {secret.rsplit('-', 1)[1]} {plain.rsplit('-', 1)[1]}"
            await wait_output(api, job_id, tail.encode())
        # Both VMs are live: their QEMU argv and directories hold no env, the DB no secret.
        assert len(qemu_processes(d.state / "vms")) >= 2
        for value in (api_secret, api_plain, cli_secret, cli_plain):
            assert qemu_argv_holding(d.state, value) == []
            assert files_holding(d.state / "vms", value) == []
        for secret in (api_secret, cli_secret):
            assert files_holding(d.state, secret) == []

        done = await wait_terminal(api, [api_job, cli_job])
        assert {job["state"] for job in done.values()} == {"succeeded"}
        assert f"raw {api_secret}".encode() in await output(api, api_job)
        assert cli_secret.encode() not in await output(api, cli_job)

    # The one place a secret may be is the output of the job that printed it.
    assert files_holding(d.state, api_secret) == [f"logs/{api_job}.log"]
    for value in (api_plain, cli_secret, cli_plain):
        assert files_holding(d.state, value) == []
    assert d.stop() == 0
    for value in (api_secret, api_plain, cli_secret, cli_plain):
        assert value not in d.log()
        assert files_holding(d.state, value) == ([f"logs/{api_job}.log"]
                                                 if value == api_secret else [])


async def test_a_queued_job_whose_secrets_a_restart_took_ends_with_the_reason(
    daemon_factory: Any,
) -> None:
    d: DaemonProcess = daemon_factory(concurrency="1", grace="1")
    d.start()
    d.wait_for("READY=1")
    secret, plain = canary("secret"), canary("plain")
    async with ApiClient(d.api) as api:
        blocker = (await api.submit({"script": "sleep 300"}))["id"]
        await wait_state(api, blocker, "running")
        lost = (await api.submit({"script": "echo lost-job-ran"},
                                 secret_env={"TOKEN": secret}))["id"]
        kept = (await api.submit({"script": 'echo "kept ${P#sf-canary-plain-}"',
                                  "env": {"P": plain}}))["id"]
        for job_id in (lost, kept):
            assert (await api.job(job_id))["state"] == "queued"
    assert d.stop() == 0
    d.start()
    d.wait_for("READY=1")
    async with ApiClient(d.api) as api:
        job = await api.job(lost)
        assert job["state"] == "system_failure"
        assert job["reason"] == f"{SECRETS_LOST_REASON} (secret env: TOKEN)"
        assert b"lost-job-ran" not in await output(api, lost)
        done = (await wait_terminal(api, [kept]))[kept]
        assert done["state"] == "succeeded"
        assert f"kept {plain.rsplit('-', 1)[1]}".encode() in await output(api, kept)
        assert (await api.job(blocker))["state"] == "cancelled"
    assert d.stop() == 0
    for value in (secret, plain):
        assert files_holding(d.state, value) == []
        assert value not in d.log()


async def test_a_gitlab_job_token_stays_out_of_the_state_dir_and_logs(
    daemon_factory: Any, tmp_path: Path,
) -> None:
    from tests.test_gitlab_executor import Runner

    d: DaemonProcess = daemon_factory()
    d.start()
    d.wait_for("READY=1")
    token = canary("secret")
    runner = Runner(d, 777, tmp_path)
    prepare = runner.step("prepare")
    assert prepare.returncode == 0, prepare.stderr
    stage = await runner.start_run(
        "build_script",
        f"export CI_JOB_TOKEN='{token}'\n"
        'echo "got ${CI_JOB_TOKEN#sf-canary-secret-}"; sleep 4; echo "raw $CI_JOB_TOKEN"',
    )
    assert stage.stdout is not None
    first = await asyncio.wait_for(stage.stdout.readline(), 120)
    assert first.decode() == f"got {token.rsplit('-', 1)[1]}\n"
    assert qemu_argv_holding(d.state, token) == []
    assert files_holding(d.state, token) == []
    out, err = await asyncio.wait_for(stage.communicate(), 120)
    assert stage.returncode == 0, err
    assert out.decode() == f"raw {token}\n"  # the job's own output: the one place it may be
    cleanup = runner.step("cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    assert d.stop() == 0
    assert files_holding(d.state, token) == []
    assert token not in d.log()
