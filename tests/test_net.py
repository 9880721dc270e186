"""runner.net against real namespaces, veths, taps and nftables (root only).

Traffic stays on this host: every socket here talks to an address on a veth
these tests made. Host ip_forward is never touched (``egress=False``); the
isolation test turns on forwarding only on its own two host veth ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from runner.errors import ConfigError, NetworkError
from runner.net import CloneNetwork, NetConfig
from runner.net.forwarding import ForwardingLease
from runner.net.manager import NetworkManager
from runner.net.nft import host_ruleset, ns_policy
from runner.net.policy import Allow, EgressPolicy

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
# Names of our own, so a daemon (or another test run) on this host keeps its
# namespaces, veths and rules, and the leak check sees only ours.
INSTANCE = "tst0"
HOST_TABLE = f"sft_{INSTANCE}"
NS_PREFIX = f"sft-{INSTANCE}-"
VETH_PREFIX = f"sft{INSTANCE}"
POOL = IPv4Network("10.242.0.0/24")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


# -- helpers ---------------------------------------------------------------------


async def run(*argv: str, check: bool = True, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), 30
    )
    rc = proc.returncode
    assert rc is not None
    if check and rc != 0:
        raise AssertionError(f"{argv} exited {rc}: {err.decode()}")
    return rc, out.decode(), err.decode()


async def ip_json(*args: str, netns: str | None = None) -> Any:
    argv = ["ip", "-j", *(("-n", netns) if netns else ()), *args]
    _, out, _ = await run(*argv)
    return json.loads(out) if out.strip() else []


async def host_links() -> dict[str, Any]:
    return {link["ifname"]: link for link in await ip_json("-d", "link", "show")}


def sf_namespaces() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns") if n.startswith(NS_PREFIX)}
    except FileNotFoundError:
        return set()


async def sf_veths() -> set[str]:
    return {name for name in await host_links() if name.startswith(VETH_PREFIX)}


def vm_id() -> str:
    return secrets.token_hex(4)


CLIENT = """
import socket, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.settimeout(3)
if source:
    s.bind((source, 0))
try:
    s.connect((host, port))
    print("connected", s.recv(16).decode())
except OSError as exc:
    print("failed", type(exc).__name__)
"""


async def connect_from(net: CloneNetwork, host: str, port: int, source: str = "") -> str:
    """Open a real TCP connection from inside ``net``'s namespace; say how it went."""
    _, out, _ = await run(*net.exec_prefix(), sys.executable, "-c", CLIENT, host, str(port), source)
    return out.strip()


class Server:
    """A TCP server on one address that records the peers it saw."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self, address: str) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[0])
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, address, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def nft_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    _, out, _ = await run(*prefix, "nft", "-j", "list", *args)
    items: list[dict[str, Any]] = json.loads(out)["nftables"]
    return [i for i in items if "metainfo" not in i]


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 5) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.05)
    return await cond()


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
async def no_leftovers() -> AsyncIterator[None]:
    """Fail a test whose code under test left a namespace or host veth; remove them."""
    ns_before, veths_before = sf_namespaces(), await sf_veths()
    yield
    ns_left = sf_namespaces() - ns_before
    veths_left = await sf_veths() - veths_before
    for name in ns_left:
        await run("ip", "netns", "delete", name, check=False)
    for name in veths_left:
        await run("ip", "link", "delete", name, check=False)
    assert not ns_left, f"namespaces left behind: {ns_left}"
    assert not veths_left, f"host veths left behind: {veths_left}"


@pytest.fixture
def config() -> NetConfig:
    return NetConfig(
        instance=INSTANCE,
        host_table="sft",
        netns_prefix="sft-",
        host_veth_prefix="sft",
        pool=POOL,
    )


@pytest.fixture
def manager(config: NetConfig, no_leftovers: None) -> NetworkManager:
    return NetworkManager(config)


@pytest.fixture
async def host_rules(manager: NetworkManager) -> AsyncIterator[NetworkManager]:
    forward = IP_FORWARD.read_text()
    await manager.setup_host()
    await manager.setup_host()  # idempotent: replaces, never duplicates
    yield manager
    await manager.teardown_host()
    await manager.teardown_host()
    rc, _, _ = await run("nft", "list", "table", "inet", HOST_TABLE, check=False)
    assert rc != 0, "teardown_host left the table"
    assert IP_FORWARD.read_text() == forward, "egress=False must not touch host ip_forward"


# -- pure --------------------------------------------------------------------------------


def test_config_defaults_and_names() -> None:
    c = NetConfig(instance="k2x7")
    assert c.guest_kernel_args() == "snapfleet.ip=172.16.0.2/30 snapfleet.gw=172.16.0.1"
    assert c.slots == 16384
    assert c.netns_name("ab12") == "sf-k2x7-ab12"
    assert c.host_veth("01234567") == "sfhk2x701234567"  # all 15 bytes
    assert c.own_host_table == "snapfleet_k2x7"
    assert [str(a) for a in c.slot_addresses(1)] == ["10.241.0.5/30", "10.241.0.6/30"]
    for bad in ("", "ABC", "a-b", "012345678", "a b", "x;y"):
        with pytest.raises(ConfigError):
            c.netns_name(bad)
    with pytest.raises(ConfigError):
        c.slot_addresses(16384)


@pytest.mark.parametrize(
    "override",
    [
        {"guest_address": "172.16.0.6/30"},
        {"guest_address": "172.16.0.1/30"},
        {"pool": "10.241.0.0/31"},
        {"host_veth_prefix": "sfhx"},
        {"instance": "AB!1"},
        {"instance": "abcde"},
        {"allow_host_ports": [0]},
        {"tap": "tap0;rm"},
        {"host_table": "bad table"},
        {"pool": "172.16.0.0/16"},
    ],
)
def test_config_rejects(override: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        NetConfig(**override)


# -- real namespaces ----------------------------------------------------------------------


@pytest.mark.netns
@NEEDS_ROOT
async def test_create_builds_the_clone_network(manager: NetworkManager) -> None:
    forward = IP_FORWARD.read_text()
    net = await manager.create(vm_id())
    try:
        assert net.netns in sf_namespaces()
        assert net.vm_id in await manager.list_namespaces()
        assert net.vm_id in await manager.list_host_veths()

        links = {x["ifname"]: x for x in await ip_json("-d", "addr", "show", netns=net.netns)}
        assert set(links) == {"lo", "tap0", "veth0"}
        tap = links["tap0"]
        assert "UP" in tap["flags"]
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert tap["linkinfo"]["info_data"]["persist"] is True
        assert [
            (a["local"], a["prefixlen"]) for a in tap["addr_info"] if a["family"] == "inet"
        ] == [("172.16.0.1", 30)]
        veth = links["veth0"]
        assert "UP" in veth["flags"]
        assert [a["local"] for a in veth["addr_info"] if a["family"] == "inet"] == [net.ns_address]
        assert "UP" in links["lo"]["flags"]

        routes = await ip_json("route", "show", "default", netns=net.netns)
        assert [(r["gateway"], r["dev"]) for r in routes] == [(net.host_address, "veth0")]
        _, ns_forward, _ = await run(*net.exec_prefix(), "cat", str(IP_FORWARD))
        assert ns_forward.strip() == "1"

        host = (await ip_json("addr", "show", "dev", net.host_veth))[0]
        assert "UP" in host["flags"]
        assert [
            (a["local"], a["prefixlen"]) for a in host["addr_info"] if a["family"] == "inet"
        ] == [(net.host_address, 30)]
        rp = Path(f"/proc/sys/net/ipv4/conf/{net.host_veth}/rp_filter").read_text()
        assert rp.strip() == "1"

        server = Server()
        port = await server.start(net.host_address)
        try:
            assert await connect_from(net, net.host_address, port) == "connected hi"
        finally:
            await server.close()
        assert server.peers == [net.ns_address]
        assert IP_FORWARD.read_text() == forward
    finally:
        await manager.destroy(net.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_masquerade_rewrites_the_guest_side_source(manager: NetworkManager) -> None:
    net = await manager.create(vm_id())
    try:
        tables = await nft_json("ruleset", netns=net.netns)
        chains = {i["chain"]["name"]: i["chain"] for i in tables if "chain" in i}
        assert (chains["postrouting"]["type"], chains["postrouting"]["hook"]) == (
            "nat",
            "postrouting",
        )
        # Until the clone's policy is applied, the namespace forwards nothing.
        assert (chains["forward"]["hook"], chains["forward"]["policy"]) == ("forward", "drop")
        (rule,) = [i["rule"] for i in tables if "rule" in i and i["rule"]["chain"] == "postrouting"]
        expr = rule["expr"]
        assert expr[0]["match"]["left"] == {"meta": {"key": "oifname"}}
        assert expr[0]["match"]["right"] == "veth0"
        assert "masquerade" in expr[1]

        # A locally sourced packet from the tap address crosses the same
        # postrouting hook as the guest's forwarded ones. The host has no route
        # back to 172.16.0.1 and drops it by strict rp_filter, so a reply can
        # only arrive if masquerade rewrote the source to the veth address.
        server = Server()
        port = await server.start(net.host_address)
        try:
            result = await connect_from(net, net.host_address, port, source="172.16.0.1")
        finally:
            await server.close()
        assert result == "connected hi"
        assert server.peers == [net.ns_address]
    finally:
        await manager.destroy(net.vm_id)


async def rule_hits(chain: str) -> int:
    """Packets counted by the counters of one chain of the test host table."""
    table = await nft_json("table", "inet", HOST_TABLE)
    return sum(
        e["counter"]["packets"]
        for i in table
        if "rule" in i and i["rule"]["chain"] == chain
        for e in i["rule"]["expr"]
        if "counter" in e
    )


@pytest.mark.netns
@NEEDS_ROOT
async def test_clones_are_isolated_by_the_host_rule(host_rules: NetworkManager) -> None:
    manager = host_rules
    a, b = await manager.create(vm_id()), await manager.create(vm_id())
    listener: asyncio.subprocess.Process | None = None
    try:
        assert a.netns != b.netns
        assert a.slot != b.slot
        assert a.ns_address != b.ns_address
        assert a.host_veth != b.host_veth
        # Host ip_forward is off here, which would hide a missing rule. Turn on
        # forwarding only on these two veths so the rule is what stops them.
        for net in (a, b):
            Path(f"/proc/sys/net/ipv4/conf/{net.host_veth}/forwarding").write_text("1")
        listener = await asyncio.create_subprocess_exec(
            *b.exec_prefix(),
            sys.executable,
            "-c",
            "import socket,sys\n"
            "s=socket.create_server((sys.argv[1],0))\n"
            "print(s.getsockname()[1],flush=True)\n"
            "while True:\n c,_=s.accept(); c.sendall(b'hi'); c.close()\n",
            b.ns_address,
            stdout=asyncio.subprocess.PIPE,
        )
        assert listener.stdout is not None
        port = int(await asyncio.wait_for(listener.stdout.readline(), 10))

        assert await connect_from(a, b.ns_address, port) == "failed TimeoutError"
        assert await rule_hits("guest_out") > 0, "the drop rule did not see the attempt"

        # Control: without the host table the same attempt gets through, so the
        # rule (not routing or something else) is what isolates the clones.
        await manager.teardown_host()
        assert await connect_from(a, b.ns_address, port) == "connected hi"
    finally:
        if listener is not None:
            listener.kill()
            await listener.wait()
        await manager.destroy(a.vm_id)
        await manager.destroy(b.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_host_services_are_refused_except_allowed_ports(
    config: NetConfig, no_leftovers: None
) -> None:
    manager = NetworkManager(config.model_copy(update={"allow_host_ports": (0,)}))
    refused, allowed = Server(), Server()
    # Listeners on every host address, as sshd or a webhook listener would be.
    refused_port = await refused.start("0.0.0.0")
    allowed_port = await allowed.start("0.0.0.0")
    manager = NetworkManager(config.model_copy(update={"allow_host_ports": (allowed_port,)}))
    a = await manager.create(vm_id())
    b = await manager.create(vm_id())
    try:
        # Control: with no host table the guest side reaches the host's services.
        assert await connect_from(a, a.host_address, refused_port) == "connected hi"
        await manager.setup_host()
        for target in (a.host_address, b.host_address):
            assert await connect_from(a, target, refused_port) == "failed TimeoutError"
        assert await rule_hits("guest_to_host") > 0
        assert await connect_from(a, a.host_address, allowed_port) == "connected hi"
    finally:
        await manager.teardown_host()
        await refused.close()
        await allowed.close()
        await manager.destroy(a.vm_id)
        await manager.destroy(b.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_destroy_removes_everything_and_is_idempotent(manager: NetworkManager) -> None:
    links_before = set(await host_links())
    net = await manager.create(vm_id())
    # Hold the namespace open, as a VMM still running would: the veth pair
    # still dies with its host end, the tap only when the namespace goes.
    held = os.open(net.netns_path, os.O_RDONLY)
    try:
        await manager.destroy(net.vm_id)
        _, out, _ = await run(
            "nsenter", f"--net=/proc/{os.getpid()}/fd/{held}", "ip", "-j", "link", check=True
        )
        assert {x["ifname"] for x in json.loads(out)} == {"lo", "tap0"}
    finally:
        os.close(held)
    assert net.netns not in sf_namespaces()
    assert net.vm_id not in await manager.list_namespaces()
    assert net.vm_id not in await manager.list_host_veths()
    await manager.destroy(net.vm_id)
    await manager.destroy(net.vm_id)

    # The kernel frees the namespace asynchronously; its tap must be deleted,
    # not handed back to the host namespace.
    async def host_unchanged() -> bool:
        return set(await host_links()) == links_before

    assert await wait_until(host_unchanged), set(await host_links()) ^ links_before
    net2 = await manager.create(net.vm_id)  # the name and the slot are free again
    assert net2.slot == net.slot
    await manager.destroy(net.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_slots_skip_veths_of_a_previous_daemon(
    config: NetConfig, manager: NetworkManager
) -> None:
    a = await manager.create(vm_id())
    try:
        restarted = NetworkManager(config)
        b = await restarted.create(vm_id())
        try:
            assert b.slot != a.slot
            with pytest.raises(NetworkError, match="in use"):
                await restarted.create(vm_id(), slot=a.slot)
        finally:
            await restarted.destroy(b.vm_id)
    finally:
        await manager.destroy(a.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_clashing_host_veth_rolls_back(manager: NetworkManager) -> None:
    vid = vm_id()
    # No dummy driver on every host; a veth pair with a foreign peer name clashes as well.
    await run(
        "ip", "link", "add", f"{VETH_PREFIX}{vid}", "type", "veth", "peer", "name", f"sfc-{vid}"
    )
    try:
        with pytest.raises(NetworkError, match=f"create veth {VETH_PREFIX}{vid}: File exists"):
            await manager.create(vid)
        assert f"{NS_PREFIX}{vid}" not in sf_namespaces()
        assert f"{VETH_PREFIX}{vid}" in await host_links(), "rollback deleted what it had not made"
    finally:
        await run("ip", "link", "delete", f"{VETH_PREFIX}{vid}")
    net = await manager.create(vid)  # slot and name were released
    await manager.destroy(net.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_existing_namespace_is_not_taken_over(
    config: NetConfig, manager: NetworkManager
) -> None:
    net = await manager.create(vm_id())
    try:
        with pytest.raises(NetworkError, match="already has a network"):
            await manager.create(net.vm_id)
        with pytest.raises(NetworkError, match="already exists"):
            await NetworkManager(config).create(net.vm_id)
        # Neither failure removed the first clone's network.
        links = await ip_json("link", "show", netns=net.netns)
        assert {x["ifname"] for x in links} == {"lo", "tap0", "veth0"}
        assert net.host_veth in await host_links()
    finally:
        await manager.destroy(net.vm_id)


@pytest.mark.netns
@NEEDS_ROOT
async def test_late_failure_rolls_back(config: NetConfig, no_leftovers: None) -> None:
    manager = NetworkManager(config.model_copy(update={"nft": "/bin/false"}))
    vid = vm_id()
    with pytest.raises(NetworkError, match="nft failed with exit code 1"):
        await manager.create(vid)
    assert vid not in await manager.list_namespaces()
    assert vid not in await manager.list_host_veths()


@pytest.mark.netns
@NEEDS_ROOT
async def test_cancel_rolls_back_and_propagates(
    config: NetConfig, no_leftovers: None, tmp_path: Path
) -> None:
    slow = tmp_path / "nft"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    manager = NetworkManager(config.model_copy(update={"nft": str(slow)}))
    vid = vm_id()
    task = asyncio.create_task(manager.create(vid))

    async def veth_exists() -> bool:
        return f"{VETH_PREFIX}{vid}" in await host_links()

    assert await wait_until(veth_exists)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert f"{NS_PREFIX}{vid}" not in sf_namespaces()
    assert not await veth_exists()
    _, out, _ = await run("pgrep", "-f", str(slow), check=False)
    assert out == "", "the cancelled nft process was left running"


@pytest.mark.netns
@NEEDS_ROOT
async def test_invalid_vm_id_makes_nothing(manager: NetworkManager) -> None:
    with pytest.raises(ConfigError):
        await manager.create("Bad-ID")
    with pytest.raises(ConfigError):
        await manager.create("ok", slot=-1)
    with pytest.raises(ConfigError):
        await manager.destroy("../etc")


@pytest.mark.parametrize(
    ("policy", "present", "absent"),
    [
        (EgressPolicy(egress="none"), ["th dport 53 accept"], ["egress accept\n", "drop"]),
        (
            EgressPolicy(egress="internet"),
            ["10.0.0.0/8", "169.254.0.0/16", "192.168.0.0/16", "snapfleet egress accept\n"],
            [],
        ),
        (EgressPolicy(egress="all"), ["169.254.0.0/16", "127.0.0.0/8"], ["192.168.0.0/16"]),
        (
            EgressPolicy(
                egress="none", allow=(Allow(cidr=IPv4Network("192.168.7.0/24"), ports=(443,)),)
            ),
            ["ip daddr 192.168.7.0/24 meta l4proto { tcp, udp } th dport { 443 } accept"],
            ["drop"],
        ),
    ],
)
def test_ns_policy_rules(
    config: NetConfig, policy: EgressPolicy, present: list[str], absent: list[str]
) -> None:
    from ipaddress import IPv4Address

    with_dns = config.model_copy(update={"nameservers": (IPv4Address("192.0.2.53"),)})
    script = ns_policy(with_dns, policy, IPv4Address("10.242.0.1"))
    assert script.startswith("flush chain ip snapfleet egress\n")
    for text in present:
        assert text in script
    for text in absent:
        assert text not in script


@pytest.mark.netns
@NEEDS_ROOT
async def test_every_policy_is_valid_nft(
    config: NetConfig, no_leftovers: None, tmp_path: Path
) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("0\n")
    lease = ForwardingLease("t", root=tmp_path / "reg", sysctl=str(sysctl))
    manager = NetworkManager(config, forwarding=lease)
    net = await manager.create(vm_id())
    try:
        for egress in ("none", "internet", "all"):
            policy = EgressPolicy(
                egress=egress, allow=(Allow(cidr=IPv4Network("10.9.0.0/16"), ports=(80, 443)),)
            )
            await manager.apply_policy(net, policy)
            chain = await nft_json("chain", "ip", "snapfleet", "egress", netns=net.netns)
            assert [i for i in chain if "rule" in i], f"no rules for egress {egress}"
            assert sysctl.read_text() == "1", "a forwarding policy must turn ip_forward on"
    finally:
        await manager.destroy(net.vm_id)
    assert sysctl.read_text() == "0", "the last clone's destroy must restore ip_forward"
    await run("nft", "--check", "-f", "-", stdin=host_ruleset(manager.config))


def test_forwarding_lease_restores_after_the_last_holder(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_forward"
    sysctl.write_text("0\n")
    root = tmp_path / "reg"
    a = ForwardingLease("a", root=root, sysctl=str(sysctl))
    b = ForwardingLease("b", root=root, sysctl=str(sysctl))
    a.acquire()
    b.acquire()
    assert sysctl.read_text() == "1"
    assert a.release() is False, "b still needs forwarding"
    assert sysctl.read_text() == "1"
    # A holder that died without releasing leaves an unlocked marker: ignored.
    registry = next(root.iterdir())
    (registry / "holder.dead.1").write_text("")
    assert b.release() is True
    assert sysctl.read_text() == "0"
    assert not (registry / "holder.dead.1").exists()
    # A host that had forwarding on keeps it on.
    sysctl.write_text("1\n")
    a.acquire()
    assert a.release() is True
    assert sysctl.read_text() == "1"
