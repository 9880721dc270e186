"""Shared fixtures: settings for real VMs, one engine and snapshot per session,
and a check at the end that nothing (QEMU, namespace, veth, VM directory) leaked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from runner import compose
from runner.config import Settings, load_settings
from runner.engine import Engine
from runner.net import NetConfig
from runner.net.config import instance_id
from runner.snapshots import Snapshot

CACHE_DIR = Path(os.environ.get("SNAPFLEET_CACHE_DIR", "/var/cache/snapfleet"))


def qemu_processes(marker: str) -> list[int]:
    """PIDs of QEMU processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"qemu-system" in cmdline[0] and marker.encode() in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


def leftovers(state_dir: Path, live: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Everything Snapfleet makes per VM that still exists, except the ``live`` VMs
    (an engine's ``hypervisor.live``: e.g. a warm pool's machines)."""
    keep = set(live or {})
    keep_pids = {str(getattr(m, "pid", "")) for m in (live or {}).values()}
    # Only this instance's names: other Snapfleet instances may run on this host.
    net = NetConfig(instance=instance_id(state_dir))
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    vms = state_dir / "vms"
    ns_names = [line.split()[0] for line in netns.splitlines()]
    link_names = [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()]
    found = {
        "qemu": [str(p) for p in qemu_processes(str(state_dir))],
        "netns": [n for n in ns_names if net.vm_id_from(n, net.own_netns_prefix)],
        "veth": [n for n in link_names if net.vm_id_from(n, net.own_veth_prefix)],
        "vm_dirs": sorted(p.name for p in vms.iterdir()) if vms.exists() else [],
    }
    found["locks"] = [d.removesuffix(".lock") for d in found["vm_dirs"] if d.endswith(".lock")]
    found["vm_dirs"] = [d for d in found["vm_dirs"] if not d.endswith(".lock")]
    found["qemu"] = [p for p in found["qemu"] if p not in keep_pids]
    found["netns"] = [n for n in found["netns"] if n[len(net.own_netns_prefix) :] not in keep]
    found["veth"] = [n for n in found["veth"] if n[len(net.own_veth_prefix) :] not in keep]
    found["vm_dirs"] = [d for d in found["vm_dirs"] if d not in keep]
    found["locks"] = [d for d in found["locks"] if d not in keep]
    return found


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    # Short path: QEMU and the kernel limit socket and interface name lengths.
    path = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
    yield path
    left = leftovers(path)
    table = NetConfig(instance=instance_id(path)).own_host_table
    if subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode == 0:
        left["nft_table"] = [table]  # the session's engine removes it on the way out
    shutil.rmtree(path, ignore_errors=True)
    assert not any(left.values()), f"the test session leaked: {left}"


@pytest.fixture(scope="session")
def settings(state_dir: Path) -> Settings:
    # Tests never turn on host-wide forwarding (egress "none", no resolvers); the
    # isolation tests run instances in namespaces of their own to test egress.
    return load_settings(
        None,
        paths={"cache_dir": CACHE_DIR, "state_dir": state_dir},
        net={"egress": "none", "dns": []},
    )


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    async with compose.engine(settings) as eng:
        yield eng


@pytest.fixture(scope="session")
async def snapshot(engine: Engine, settings: Settings) -> Snapshot:
    """The default profile's snapshot (built on first use, cached afterwards)."""
    return await engine.snapshot(settings.profile(), lambda m: print(f"[setup] {m}", flush=True))


# Daemon fixtures live with the daemon helper; importing them here shares them.
from tests.daemons import daemon, daemon_factory  # noqa: E402, F401
