"""A `snapfleet serve` subprocess for tests, and fixtures to make them."""

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

import aiohttp
import pytest

from runner.api.client import ApiClient
from runner.config import Settings
from runner.net.config import NetConfig, instance_id
from runner.snapshots import Snapshot
from runner.vm.qemu import qemu_processes

_COUNTER = itertools.count()
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "system_failure"}


class DaemonProcess:
    """One `snapfleet serve` subprocess with its own state dir and notify socket."""

    def __init__(self, root: Path, settings: Settings, *, toml: str = "",
                 env: dict[str, str] | None = None, **extra: str) -> None:
        self.root = root
        self.state = root / "state"
        self.run = root / "run"
        self.api = root / "api.sock"
        self.config = root / "config.toml"
        lines = [
            "[paths]", f'state_dir = "{self.state}"', f'cache_dir = "{settings.paths.cache_dir}"',
            f'runtime_dir = "{self.run}"',
            "[net]", "egress = false", "dns = []",
            "[daemon]", f'api_socket = "{self.api}"',
            f'metrics_listen = "unix:{root / "metrics.sock"}"',
            f"shutdown_grace_s = {extra.pop('grace', '5')}",
            f"reconcile_interval_s = {extra.pop('reconcile', '60')}",
            "[capacity]", "vcpus = 4", f"max_concurrency = {extra.pop('concurrency', '4')}",
        ]
        self.config.write_text("\n".join(lines) + "\n" + toml)
        self.env = env or {}
        self.notify_path = root / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False
        """Last ended by `kill9` (it could not clean up after itself)."""
        self.messages: list[str] = []

    def start(self) -> None:
        self.killed = False
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": str(self.notify_path)}
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

    async def metrics(self) -> dict[str, float]:
        """The daemon's Prometheus samples, by `name{labels}`."""
        from prometheus_client.parser import text_string_to_metric_families

        connector = aiohttp.UnixConnector(path=str(self.root / "metrics.sock"))
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.get("http://snapfleet/metrics") as resp:
            text = await resp.text()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples

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
        self.killed = True

    @property
    def host_table(self) -> str:
        """The instance's host nftables table (see `runner.net.config.instance_id`)."""
        return NetConfig(instance=instance_id(self.state)).own_host_table

    def has_host_table(self) -> bool:
        return subprocess.run(["nft", "list", "table", "inet", self.host_table],
                              capture_output=True).returncode == 0

    def vm_dirs(self) -> list[str]:
        vms = self.state / "vms"
        return sorted(p.name for p in vms.iterdir()) if vms.exists() else []


@pytest.fixture
def daemon_factory(state_dir: Path, settings: Settings, snapshot: Snapshot
                   ) -> Iterator[Any]:
    made: list[DaemonProcess] = []

    def make(**extra: Any) -> DaemonProcess:
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
        if d.proc is not None and d.killed and d.has_host_table():
            # A daemon killed for good never comes back to remove its table: the test
            # made it, the test removes it (a restart of the instance would).
            subprocess.run(["nft", "delete", "table", "inet", d.host_table], check=True)
        assert not d.has_host_table(), f"a stopped daemon left its nft table {d.host_table}"


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


