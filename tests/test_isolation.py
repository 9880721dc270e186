"""What a job's guest can reach, tried from inside real clones.

The Snapfleet instance under test runs in a namespace of its own ("host")
whose default route leads into a fake "outside" namespace this test owns:
an "internet" server (203.0.113.10), a "LAN" server (192.168.50.1), a
listener on the metadata address (169.254.169.254) and a real resolver
(dnsmasq) serving a name of ours. The host namespace runs its own listener
on 0.0.0.0, as a webhook listener or sshd would. No packet leaves this machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.config import Settings

pytestmark = [
    pytest.mark.vm,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (install.sh --dev)"),
]

UPLINK_HOST = "198.51.100.2"  # the host's own address (its uplink)
UPLINK_OUT = "198.51.100.1"
INTERNET = "203.0.113.10"
RESOLVER = "203.0.113.53"
LAN = "192.168.50.1"
METADATA = "169.254.169.254"
NAME = "svc.snapfleet.test"
PORT = 8080
HOST_PORT = 8089

# Serves one line naming the address it was reached at, on every address.
SERVER = """
import socket, sys, threading
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(("hello from " + c.getsockname()[0] + "\\n").encode())
    c.close()
"""

# Runs in the guest: tries each target at once, prints one JSON object.
PROBE = """
import json, socket, sys, concurrent.futures as cf
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(3)
            return s.recv(64).decode().strip() or "connected"
    except OSError as exc:
        return "blocked: " + type(exc).__name__
targets = sys.argv[1:]
with cf.ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(dict(zip(targets, pool.map(probe, targets)))))
"""


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: {proc.stderr}")
    return proc.stdout


@dataclass
class World:
    host: str
    outside: str
    root: Path
    procs: list[subprocess.Popen[str]]

    def in_host(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.host, *argv]

    def start(self, netns: str, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        return proc


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tag = secrets.token_hex(3)
    host, outside = f"sfx-{tag}-host", f"sfx-{tag}-out"
    root = Path(f"/tmp/sfx-{tag}")
    root.mkdir()
    resolv_dir = Path(f"/etc/netns/{host}")
    w = World(host, outside, root, [])
    try:
        sh("ip", "netns", "add", host)
        sh("ip", "netns", "add", outside)
        sh("ip", "-n", host, "link", "add", "up0", "type", "veth",
           "peer", "down0", "netns", outside)
        for ns, dev, addr in ((host, "up0", UPLINK_HOST), (outside, "down0", UPLINK_OUT)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", host, "route", "add", "default", "via", UPLINK_OUT)
        for addr in (INTERNET, RESOLVER, LAN, METADATA):
            sh("ip", "-n", outside, "addr", "add", f"{addr}/32", "dev", "lo")
        # `ip netns exec` shows this file as the host's /etc/resolv.conf: the
        # instance must find its guests' resolver here by itself.
        resolv_dir.mkdir(parents=True)
        (resolv_dir / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")

        for ns, port in ((outside, PORT), (host, HOST_PORT)):
            proc = w.start(ns, sys.executable, "-c", SERVER, str(port))
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "listening"
        w.start(
            outside, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            f"--listen-address={RESOLVER}", "--bind-interfaces", f"--address=/{NAME}/{INTERNET}",
            f"--pid-file={root}/dnsmasq.pid",
        )
        yield w
    finally:
        for proc in w.procs:
            proc.kill()
            proc.wait()
        for ns in (host, outside):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        shutil.rmtree(resolv_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def write_config(world: World, settings: Settings, name: str, extra: str = "") -> Path:
    state = world.root / name
    config = world.root / f"{name}.toml"
    config.write_text(
        f'[paths]\nstate_dir = "{state}"\ncache_dir = "{settings.paths.cache_dir}"\n'
        # `ip netns exec` mounts a fresh /sys, without the host's cgroup hierarchies.
        "[vm]\ncgroup = false\n"
        "[profiles.default]\n[profiles.sealed]\negress = \"none\"\n" + extra
    )
    return config


async def snapfleet_run(
    world: World, config: Path, *argv: str, profile: str = "default"
) -> tuple[int, str]:
    cli = Path(sys.executable).parent / "snapfleet"
    proc = await asyncio.create_subprocess_exec(
        *world.in_host(str(cli), "--config", str(config), "run", "--profile", profile, "--", *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def probes(output: str) -> dict[str, str]:
    line = next(ln for ln in output.splitlines() if ln.startswith("{"))
    result: dict[str, str] = json.loads(line)
    return result


def ip_forward(world: World) -> str:
    return sh(*world.in_host("cat", "/proc/sys/net/ipv4/ip_forward")).strip()


async def test_host_forwards_only_while_a_clone_needs_it(
    world: World, settings: Settings, snapshot: object
) -> None:
    # Runs before the module's long-lived neighbour clone exists.
    assert ip_forward(world) == "0"
    config = write_config(world, settings, "forward")
    cli = Path(sys.executable).parent / "snapfleet"
    proc = await asyncio.create_subprocess_exec(
        *world.in_host(str(cli), "--config", str(config), "run", "--",
                       "sh", "-c", "echo up; sleep 3"),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 300)).strip() == b"up"
    assert ip_forward(world) == "1"
    await asyncio.wait_for(proc.wait(), 60)
    assert ip_forward(world) == "0", "the last clone's teardown must restore ip_forward"


@pytest.fixture(scope="module")
async def neighbour(world: World, settings: Settings, snapshot: object) -> AsyncIterator[str]:
    """Another instance's clone, alive in the host namespace while the probes run."""
    config = write_config(world, settings, "neighbour")
    cli = Path(sys.executable).parent / "snapfleet"
    proc = await asyncio.create_subprocess_exec(
        *world.in_host(str(cli), "--config", str(config), "run", "--",
                       "sh", "-c", "echo up; sleep 120"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 300)).strip() == b"up"
    veths = json.loads(sh("ip", "-n", world.host, "-j", "addr", "show"))
    addresses = [
        a["local"] for link in veths if link["ifname"].startswith("sfh")
        for a in link["addr_info"] if a["family"] == "inet"
    ]
    assert len(addresses) == 1, veths
    yield addresses[0]
    proc.terminate()
    await proc.wait()


async def test_guest_reaches_only_what_its_policy_allows(
    world: World, settings: Settings, neighbour: str
) -> None:
    config = write_config(world, settings, "probe")
    targets = [
        f"{UPLINK_HOST}:{HOST_PORT}",  # the host's own address
        f"{neighbour}:{HOST_PORT}",  # another clone's host-side address
        f"{METADATA}:{PORT}",
        f"{LAN}:{PORT}",  # a private network next to the host
        f"{INTERNET}:{PORT}",
        f"{NAME}:{PORT}",
    ]
    rc, out = await snapfleet_run(
        world, config, "sh", "-c",
        f'getent hosts {NAME} && cat /etc/resolv.conf && python3 -c "$0" "$@"',
        PROBE, *targets,
    )
    assert rc == 0, out
    assert any(ln.split() == [INTERNET, NAME] for ln in out.splitlines()), out
    assert f"nameserver {RESOLVER}" in out
    seen = probes(out)
    assert seen[f"{INTERNET}:{PORT}"] == f"hello from {INTERNET}"
    assert seen[f"{NAME}:{PORT}"] == f"hello from {INTERNET}"
    for blocked in targets[:4]:
        assert seen[blocked].startswith("blocked"), (blocked, seen)


async def test_egress_none_reaches_nothing_outside(
    world: World, settings: Settings, neighbour: str
) -> None:
    config = write_config(world, settings, "sealed")
    targets = [f"{INTERNET}:{PORT}", f"{LAN}:{PORT}", f"{UPLINK_HOST}:{HOST_PORT}"]
    rc, out = await snapfleet_run(
        world, config, "sh", "-c", f'getent hosts {NAME}; python3 -c "$0" "$@"', PROBE, *targets,
        profile="sealed",
    )
    assert rc == 0, out
    assert any(ln.split() == [INTERNET, NAME] for ln in out.splitlines()), (
        "name resolution must work with egress none"
    )
    seen = probes(out)
    for target in targets:
        assert seen[target].startswith("blocked"), (target, seen)


async def test_allow_list_and_host_ports_open_exactly_that(
    world: World, settings: Settings, neighbour: str
) -> None:
    config = write_config(
        world, settings, "allowed",
        f"[net]\nallow_host_ports = [{HOST_PORT}]\n"
        f'[[profiles.sealed.allow]]\ncidr = "{LAN}/32"\nports = [{PORT}]\n',
    )
    gateway = "172.16.0.1"  # the guest's gateway: where an offered host port is reached
    targets = [
        f"{LAN}:{PORT}",
        f"{INTERNET}:{PORT}",
        f"{METADATA}:{PORT}",
        f"{gateway}:{HOST_PORT}",
        f"{UPLINK_HOST}:{PORT}",  # a host port not offered
    ]
    rc, out = await snapfleet_run(world, config, "python3", "-c", PROBE, *targets, profile="sealed")
    assert rc == 0, out
    seen = probes(out)
    assert seen[f"{LAN}:{PORT}"] == f"hello from {LAN}"
    assert seen[f"{gateway}:{HOST_PORT}"].startswith("hello from 10.241."), seen
    for blocked in targets[1:3] + targets[4:]:
        assert seen[blocked].startswith("blocked"), (blocked, seen)
