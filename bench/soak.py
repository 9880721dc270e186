"""Fault soak: many jobs with faults injected, then count what was lost or leaked.

Jobs of four kinds are queued on one daemon: plain ones, guest kernel panics
(`echo c > /proc/sysrq-trigger`), guest power-offs (`echo o > ...`), and
long ones whose QEMU the soak kills with SIGKILL once it runs. Every
`--restart-every` jobs the daemon itself is killed with SIGKILL and started
again. At the end the daemon is stopped politely and the host is searched for
anything of this instance: QEMU processes, namespaces, host veths, VM
directories and lock files, cgroups.

    .venv/bin/python -m bench.soak [--jobs 300] [--concurrency 4] [--json]

`--json` prints {"jobs", "lost", "leaked", "jobs_per_min", "outcomes", ...}
as the last line. A job is lost if it never reached a terminal state;
outcomes are counted per kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._stats import log
from runner.api.client import ApiClient
from runner.net import NetConfig
from runner.net.config import instance_id
from runner.vm import cgroup
from runner.vm.qemu import qemu_processes

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "system_failure"}
KINDS = {
    "plain": "echo ok",
    "panic": "sleep 0.5; echo c > /proc/sysrq-trigger; sleep 60",
    "poweroff": "sleep 0.5; echo o > /proc/sysrq-trigger; sleep 60",
    "vmm_kill": "echo started; sleep 60",
}
CONFIG = """
[paths]
state_dir = "{root}/state"
cache_dir = "{cache_dir}"
[net]
egress = "none"
dns = []
[daemon]
api_socket = "{root}/api.sock"
metrics_listen = ""
shutdown_grace_s = 10
reconcile_interval_s = 5
[capacity]
vcpus = {concurrency}
max_concurrency = {concurrency}
[profiles.default]
timeout_s = {timeout}
"""


class Daemon:
    """`snapfleet serve` in a scratch directory, killable and restartable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(root / "notify"))

    def start(self) -> None:
        with open(self.root / "daemon.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runner.cli", "--config", str(self.root / "config.toml"),
                 "serve"],
                env={**os.environ, "NOTIFY_SOCKET": str(self.root / "notify")},
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.notify.settimeout(600)
        while b"READY=1" not in self.notify.recv(4096):
            pass

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def leftovers(state: Path) -> dict[str, list[str]]:
    net = NetConfig(instance=instance_id(state))
    netns = os.listdir(net.netns_dir) if os.path.isdir(net.netns_dir) else []
    vms = state / "vms"
    return {
        "qemu": [str(p) for p in qemu_processes(vms)],
        "netns": [n for n in netns if n.startswith(net.own_netns_prefix)],
        "veth": [n for n in os.listdir("/sys/class/net") if n.startswith(net.own_veth_prefix)],
        "vm_files": sorted(p.name for p in vms.iterdir()) if vms.exists() else [],
        "cgroups": sorted(cgroup.list_groups(Path("/sys/fs/cgroup"), net.instance)),
    }


async def kill_running_vmm(sock: Path, job_id: str, vms: Path, deadline: float) -> None:
    """Once ``job_id`` runs, SIGKILL its QEMU (found by its VM id)."""
    while time.monotonic() < deadline:
        try:
            async with ApiClient(sock) as api:
                job = await api.job(job_id)
        except Exception:  # the daemon may be restarting
            await asyncio.sleep(0.5)
            continue
        if job["state"] in TERMINAL:
            return
        vm_id = job.get("vm_id")
        pid = qemu_processes(vms).get(vm_id) if vm_id and job["state"] == "running" else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            return
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sf-soak-", dir="/tmp"))
    (root / "config.toml").write_text(CONFIG.format(
        root=root, cache_dir=args.cache_dir, concurrency=args.concurrency, timeout=args.timeout))
    daemon = Daemon(root)
    rng = random.Random(args.seed)
    kinds: dict[str, str] = {}
    killers: list[asyncio.Task[None]] = []
    restarts = 0
    started = time.monotonic()
    daemon.start()
    try:
        for i in range(args.jobs):
            if i and i % args.restart_every == 0:
                daemon.kill9()
                restarts += 1
                daemon.start()
                log(f"{i} jobs queued; daemon killed and restarted ({restarts})")
            kind = rng.choices(list(KINDS), weights=[6, 1, 1, 1])[0]
            async with ApiClient(root / "api.sock") as api:
                job = await api.submit({"script": KINDS[kind]})
            kinds[job["id"]] = kind
            if kind == "vmm_kill":
                killers.append(asyncio.create_task(kill_running_vmm(
                    root / "api.sock", job["id"], root / "state" / "vms",
                    time.monotonic() + 600)))
            await asyncio.sleep(rng.uniform(0, 0.3))
        log("all queued; waiting for every job to end")
        final: dict[str, str] = {}
        deadline = time.monotonic() + args.jobs * 5 + 600
        async with ApiClient(root / "api.sock") as api:
            while len(final) < len(kinds) and time.monotonic() < deadline:
                for job_id in kinds:
                    if job_id not in final:
                        state = (await api.job(job_id))["state"]
                        if state in TERMINAL:
                            final[job_id] = state
                await asyncio.sleep(1)
        elapsed = time.monotonic() - started
        for task in killers:
            task.cancel()
        await asyncio.gather(*killers, return_exceptions=True)
    finally:
        rc = daemon.stop()
    left = leftovers(root / "state")
    outcomes: dict[str, dict[str, int]] = {}
    for job_id, kind in kinds.items():
        outcomes.setdefault(kind, Counter())[final.get(job_id, "lost")] += 1
    result = {
        "jobs": len(kinds),
        "lost": len(kinds) - len(final),
        "leaked": sum(len(v) for v in left.values()),
        "leftovers": {k: v for k, v in left.items() if v},
        "jobs_per_min": round(len(final) / elapsed * 60, 1),
        "daemon_restarts": restarts,
        "daemon_exit": rc,
        "outcomes": {k: dict(v) for k, v in outcomes.items()},
    }
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--restart-every", type=int, default=60)
    p.add_argument("--timeout", type=float, default=60, help="per-job timeout_s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("SNAPFLEET_CACHE_DIR", "/var/cache/snapfleet")))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()


    result = asyncio.run(soak(args, log))
    print(f"jobs {result['jobs']}, lost {result['lost']}, leaked {result['leaked']}, "
          f"{result['jobs_per_min']} jobs/min, daemon restarts {result['daemon_restarts']}")
    for kind, counts in result["outcomes"].items():
        print(f"  {kind:9} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if result["leftovers"]:
        print(f"  leftovers: {result['leftovers']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
