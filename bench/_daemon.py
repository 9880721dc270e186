"""Shared by the benches: run `snapfleet serve` in a scratch directory."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench._stats import percentiles
from runner.api.client import ApiClient

__all__ = ["first_output_ms", "percentiles", "running_daemon"]


CONFIG = """
[paths]
state_dir = "{root}/state"
cache_dir = "{cache_dir}"
runtime_dir = "{root}/run"
[net]
egress = false
dns = []
[daemon]
api_socket = "{root}/api.sock"
metrics_listen = ""
shutdown_grace_s = 30
[capacity]
vcpus = {concurrency}
max_concurrency = {concurrency}
[gitlab]
allowed_profiles = ["default", "warm"]
[profiles.default]
[profiles.warm]
warm = 2
"""


@contextlib.contextmanager
def running_daemon(
    cache_dir: Path,
    concurrency: int,
    log: Callable[[str], None],
    *,
    extra_toml: Callable[[Path], str] = lambda _root: "",
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """Yields (scratch dir with config.toml and api.sock, the daemon process)."""
    root = Path(tempfile.mkdtemp(prefix="sf-bd-", dir="/tmp"))
    (root / "config.toml").write_text(
        CONFIG.format(root=root, cache_dir=cache_dir, concurrency=concurrency) + extra_toml(root)
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify"))
    with open(root / "daemon.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "--config", str(root / "config.toml"), "serve"],
            env={"NOTIFY_SOCKET": str(root / "notify"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                 **(env or {})},
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            notify.settimeout(600)
            while b"READY=1" not in notify.recv(4096):
                pass
            yield root, proc
        except BaseException:
            log((root / "daemon.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            notify.close()
            shutil.rmtree(root, ignore_errors=True)


async def first_output_ms(api: ApiClient, profile: str, *, script: str = "echo ready") -> float:
    """Queue → the job's first output line, ms (Snapfleet's own notes skipped)."""
    started = time.monotonic()
    job = await api.submit({"script": script, "profile": profile})
    async for chunk in api.logs(job["id"], follow=True):
        if any(not line.startswith(b"[snapfleet]") for line in chunk.splitlines() if line):
            return (time.monotonic() - started) * 1000
    raise RuntimeError(f"job {job['id']} produced no output")
