"""`snapfleet serve` as a real process: jobs, concurrency, crash recovery, shutdown."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.api.client import ApiClient
from runner.config import Settings
from runner.errors import ConfigError
from runner.service.recovery import LOST_JOB_REASON, qemu_processes
from runner.snapshots import Snapshot

pytestmark = pytest.mark.vm
_COUNTER = itertools.count()
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "system_failure"}


class DaemonProcess:
    """One `snapfleet serve` subprocess with its own state dir and notify socket."""

    def __init__(self, root: Path, settings: Settings, **extra: str) -> None:
        self.root = root
        self.state = root / "state"
        self.api = root / "api.sock"
        self.config = root / "config.toml"
        lines = [
            "[paths]", f'state_dir = "{self.state}"', f'cache_dir = "{settings.paths.cache_dir}"',
            "[net]", "egress = false",
            "[daemon]", f'api_socket = "{self.api}"', 'metrics_listen = ""',
            f"shutdown_grace_s = {extra.pop('grace', '5')}",
            "[capacity]", "vcpus = 4", f"max_concurrency = {extra.pop('concurrency', '4')}",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.notify_path = root / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []

    def start(self) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path)}
        with open(self.root / "daemon.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runner.cli", "--config", str(self.config), "serve"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def wait_for(self, message: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            if message in data.split("\n"):
                return
        raise AssertionError(f"no {message} from the daemon; log: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def vm_dirs(self) -> list[str]:
        vms = self.state / "vms"
        return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


@pytest.fixture
def daemon_factory(state_dir: Path, settings: Settings, snapshot: Snapshot
                   ) -> Iterator[Any]:
    made: list[DaemonProcess] = []

    def make(**extra: str) -> DaemonProcess:
        root = state_dir / f"d{next(_COUNTER)}"
        root.mkdir()
        d = DaemonProcess(root, settings, **extra)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert not d.vm_dirs(), f"daemon left VM directories: {d.vm_dirs()}"
        assert not qemu_processes(d.state / "vms")


@pytest.fixture
async def daemon(daemon_factory: Any) -> AsyncIterator[DaemonProcess]:
    d: DaemonProcess = daemon_factory()
    d.start()
    d.wait_for("READY=1")
    yield d
    assert d.stop() == 0


async def wait_terminal(api: ApiClient, job_ids: list[str], timeout: float = 600
                        ) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs not finished: {set(job_ids) - set(done)}"
        for job_id in job_ids:
            if job_id not in done:
                job = await api.job(job_id)
                if job["state"] in TERMINAL:
                    done[job_id] = job
        await asyncio.sleep(0.2)
    return done


async def wait_state(api: ApiClient, job_id: str, state: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (await api.job(job_id))["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} never reached {state}"
        await asyncio.sleep(0.1)


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
