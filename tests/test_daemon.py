"""`snapfleet serve` as a real process: jobs, concurrency, crash recovery, shutdown."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.api.client import ApiClient
from runner.errors import ConfigError
from runner.service.recovery import LOST_JOB_REASON
from runner.vm.qemu import qemu_processes
from tests.daemons import DaemonProcess, wait_state, wait_terminal

pytestmark = pytest.mark.vm


async def test_forty_jobs_four_at_a_time(daemon: DaemonProcess) -> None:
    async with ApiClient(daemon.api) as api:
        ids = [
            (await api.submit({"script": f"echo job-{i}; exit $(({i} % 3))"}))["id"]
            for i in range(40)
        ]
        peak = 0
        while True:
            status = await api.status()
            peak = max(peak, len(status["running"]))
            assert len(status["running"]) <= 4
            if not status["running"] and not status["queued"]:
                break
            await asyncio.sleep(0.1)
        jobs = await wait_terminal(api, ids)
        for i, job_id in enumerate(ids):
            job = jobs[job_id]
            assert job["state"] == ("succeeded" if i % 3 == 0 else "failed"), job
            assert job["exit_code"] == i % 3
            text = b"".join([c async for c in api.logs(job_id)]).decode()
            assert f"job-{i}\n" in text
            assert "restored default from snapshot" in text
        assert peak == 4
        assert (await api.status())["vms"] == []
    assert daemon.vm_dirs() == []
    # Job output and job env (secrets) are for root only.
    private = [daemon.state / "snapfleet.db", *(daemon.state / "logs").glob("*.log")]
    assert len(private) == 41
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in private} == {"0o600"}
    metrics = await daemon.metrics()
    assert metrics['snapfleet_jobs_total{outcome="succeeded"}'] == 14
    assert metrics['snapfleet_jobs_total{outcome="failed"}'] == 26
    assert metrics["snapfleet_restore_seconds_count{pool=\"cold\"}"] == 40
    assert metrics['snapfleet_jobs_current{state="running"}'] == 0
    assert metrics["snapfleet_vms_running{}"] == 0


async def test_kill9_then_restart_reclaims_and_fails_lost_jobs(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    d.start()
    d.wait_for("READY=1")
    async with ApiClient(d.api) as api:
        lost = [(await api.submit({"script": "echo up; sleep 300"}))["id"] for _ in range(2)]
        for job_id in lost:
            await wait_state(api, job_id, "running")
    d.kill9()
    orphans = qemu_processes(d.state / "vms")
    assert len(orphans) == 2  # the VMs outlived the daemon
    d.start()
    d.wait_for("READY=1")
    # READY comes only after recovery: the orphans are already gone.
    assert qemu_processes(d.state / "vms") == {}
    assert d.vm_dirs() == []
    async with ApiClient(d.api) as api:
        for job_id in lost:
            job = await api.job(job_id)
            assert job["state"] == "system_failure"
            assert job["reason"] == LOST_JOB_REASON
        fresh = (await api.submit({"script": "echo after-restart"}))["id"]
        job = (await wait_terminal(api, [fresh]))[fresh]
        assert job["state"] == "succeeded"
    assert d.stop() == 0


async def test_sigterm_lets_short_jobs_finish_and_cancels_long_ones(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(grace="6")
    d.start()
    d.wait_for("READY=1")
    async with ApiClient(d.api) as api:
        short = (await api.submit({"script": "sleep 2; echo short-done"}))["id"]
        long = (await api.submit({"script": "sleep 300"}))["id"]
        for job_id in (short, long):
            await wait_state(api, job_id, "running")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 30
    d.wait_for("STOPPING=1", timeout=2)
    # The daemon is gone; read the outcome from a fresh one (same state).
    d.start()
    d.wait_for("READY=1")
    async with ApiClient(d.api) as api:
        assert (await api.job(short))["state"] == "succeeded"
        cancelled = await api.job(long)
        assert cancelled["state"] == "cancelled"
        assert "shut down" in cancelled["reason"]
    assert d.stop() == 0


async def test_bad_jobs_are_refused_clearly_and_the_daemon_keeps_serving(
    daemon: DaemonProcess,
) -> None:
    async with ApiClient(daemon.api) as api:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"script": "true", "profile": "gpu"}, "unknown profile 'gpu'"),
            ({"script": "true", "labels": ["arm64"]}, "no profile serves labels ['arm64']"),
            ({"scirpt": "true"}, "scirpt"),
            ({"script": "true", "timeout_s": -5}, "timeout_s"),
        ]
        for spec, message in cases:
            with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
                await api.submit(spec)
        job = await api.submit({"script": "echo still-serving"})
        done = await wait_terminal(api, [job["id"]])
        assert done[job["id"]]["state"] == "succeeded"


async def test_cancel_a_running_job(daemon: DaemonProcess) -> None:
    async with ApiClient(daemon.api) as api:
        job_id = (await api.submit({"script": "echo begin; sleep 300"}))["id"]
        await wait_state(api, job_id, "running")
        await api.cancel(job_id)
        job = (await wait_terminal(api, [job_id], timeout=60))[job_id]
        assert job["state"] == "cancelled"
        assert (await api.status())["vms"] == []


async def test_timeout_is_enforced_by_the_daemon(daemon: DaemonProcess) -> None:
    async with ApiClient(daemon.api) as api:
        job_id = (await api.submit({"script": "sleep 300", "timeout_s": 3}))["id"]
        job = (await wait_terminal(api, [job_id], timeout=60))[job_id]
        assert job["state"] == "timed_out"


def test_bad_config_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[capacity]\nmax_concurrency = 0\n[daemon]\nshutdown_grace_s = 'soon'\n")
    done = subprocess.run([sys.executable, "-m", "runner.cli", "--config", str(cfg), "serve"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 125
    assert "capacity.max_concurrency" in done.stderr
    assert "daemon.shutdown_grace_s" in done.stderr


async def test_cli_follows_a_queued_job_and_exits_with_its_code(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory(concurrency="1")
    d.start()
    d.wait_for("READY=1")
    cli = [sys.executable, "-m", "runner.cli", "--config", str(d.config)]
    async with ApiClient(d.api) as api:
        await api.submit({"script": "sleep 2"})
        queued = subprocess.run([*cli, "submit"], input='script = "echo second-output; exit 4"\n',
                                capture_output=True, text=True, timeout=60, check=True)
        job_id = queued.stdout.strip()
        assert (await api.job(job_id))["state"] == "queued"
    follow = await asyncio.to_thread(
        subprocess.run, [*cli, "logs", "-f", job_id], capture_output=True, text=True, timeout=120
    )
    assert "second-output\n" in follow.stdout
    assert follow.returncode == 4
    listing = subprocess.run([*cli, "jobs"], capture_output=True, text=True, timeout=60)
    assert f"{job_id}  failed" in listing.stdout
    assert d.stop() == 0


async def test_guest_panic_and_reboot_end_their_jobs_clearly(daemon: DaemonProcess) -> None:
    async with ApiClient(daemon.api) as api:
        panic = (await api.submit({"script": "echo c > /proc/sysrq-trigger; sleep 600"}))["id"]
        reboot = (await api.submit({"script": "echo b > /proc/sysrq-trigger; sleep 600"}))["id"]
        done = await wait_terminal(api, [panic, reboot], timeout=120)
        for job_id, reason, console in (
            (panic, "guest kernel panicked", "Kernel panic - not syncing"),
            (reboot, "guest rebooted", "sysrq: Resetting"),
        ):
            job = done[job_id]
            assert job["state"] == "system_failure", job
            assert job["reason"].endswith(reason), job
            # Ended by the guest's end, not the default 3600 s timeout.
            assert job["finished_at"] - job["started_at"] < 30, job
            text = b"".join([c async for c in api.logs(job_id)]).decode()
            assert "the guest's last console lines:" in text
            assert console in text, text[-2000:]
            assert "job system_failure: vm " in text
        assert (await api.status())["vms"] == []
    metrics = await daemon.metrics()
    assert metrics['snapfleet_jobs_total{outcome="system_failure"}'] == 2
