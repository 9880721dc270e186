"""NetworkManager: creates and destroys clone namespaces on the host."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import TypeVar

import structlog
from pyroute2 import AsyncIPRoute, IPRoute, NetlinkError

from runner.errors import NetworkError
from runner.net import nft
from runner.net._netns import (
    NamespaceExists,
    NewNamespace,
    list_netns,
    make_netns,
    remove_netns,
    write_sysctl,
)
from runner.net.config import CloneNetwork, NetConfig, validate_vm_id
from runner.net.forwarding import ForwardingLease
from runner.net.policy import EgressPolicy

log = structlog.get_logger(__name__)
T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"{os.strerror(exc.code)} (errno {exc.code})"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _step(vm_id: str | None, what: str) -> Iterator[None]:
    """Translate pyroute2 and OS errors of one step into NetworkError."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        where = f"vm {vm_id}: " if vm_id else ""
        raise NetworkError(f"{where}{what}: {_describe(exc)}") from exc


async def _in_own_thread(fn: Callable[[], T], on_orphan: Callable[[T], None]) -> T:
    """Run ``fn`` on a new thread that exits afterwards (it may change namespaces).

    The thread cannot be interrupted. If the caller is cancelled, wait the few
    milliseconds until it ends so the caller's rollback sees what it made;
    a result nobody will receive goes to ``on_orphan``.
    """
    cfut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            cfut.set_result(fn())
        except BaseException as exc:
            cfut.set_exception(exc)

    threading.Thread(target=run, name="snapfleet-netns", daemon=True).start()
    fut = asyncio.wrap_future(cfut)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        if not fut.cancelled() and fut.exception() is None:
            on_orphan(fut.result())
        raise


def _delete_link(name: str) -> None:
    with IPRoute() as ipr:
        ipr.link("del", ifname=name)


@dataclass
class _Made:
    """What ``create`` has built so far: exactly what its rollback undoes."""

    netns: bool = False
    veth: bool = False
    slot: bool = False


class NetworkManager:
    """Creates and destroys one network namespace per clone, and the host's rules.

    One per instance. Slots (the /30 of the pool each clone's veth pair uses)
    are held with a lock file per slot for the clone's lifetime, so several
    instances on one host never take the same one; ``create`` also skips slots
    whose addresses already sit on a host interface (a crashed instance's
    clones, not reconciled yet). Everything it names carries the instance id.
    """

    def __init__(
        self,
        config: NetConfig,
        *,
        lock_dir: str = "/run/snapfleet-net",
        forwarding: ForwardingLease | None = None,
    ) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}
        self._slot_fds: dict[str, int] = {}
        self._lock_dir = lock_dir
        self._forwarding: set[str] = set()  # clones whose policy needs ip_forward
        self._forward_lease = forwarding or ForwardingLease(config.instance)
        self._forward_lock = asyncio.Lock()

    # -- host level ---------------------------------------------------------

    async def setup_host(self) -> None:
        """Install (or replace) this instance's host nftables table. Idempotent.

        ip_forward is left alone here: ``apply_policy`` turns it on for the
        first clone that needs it, and the last one's ``destroy`` puts back
        the value it had.
        """
        await self._nft(nft.host_ruleset(self.config), None)

    async def teardown_host(self) -> None:
        """Remove the instance's host table; harmless if it is gone."""
        await self._nft(nft.host_teardown(self.config), None)
        async with self._forward_lock:
            self._forwarding.clear()
            await asyncio.to_thread(self._forward_lease.release)

    async def host_rules(self) -> str:
        """The instance's host table as nft lists it (for ``doctor --net``)."""
        return await self._nft_out(["list", "table", "inet", self.config.own_host_table])

    # -- per clone policy ------------------------------------------------------

    async def apply_policy(self, network: CloneNetwork, policy: EgressPolicy) -> None:
        """Open what ``policy`` allows in the clone's namespace (it forwards nothing before).

        The first clone whose policy forwards anything turns on host ip_forward.
        """
        if policy.forwards(self.config.nameservers):
            async with self._forward_lock:
                if not self._forwarding:
                    with _step(network.vm_id, "enable host ip_forward"):
                        await asyncio.to_thread(self._forward_lease.acquire)
                self._forwarding.add(network.vm_id)
        script = nft.ns_policy(self.config, policy, IPv4Address(network.host_address))
        await self._nft(script, network.vm_id)

    # -- per clone ------------------------------------------------------------

    async def create(self, vm_id: str, *, slot: int | None = None) -> CloneNetwork:
        """Build the namespace, tap, veth pair and NAT of one clone.

        ``slot`` picks the pool /30; by default the lowest free one. On any
        failure everything made so far is removed and NetworkError raised
        (ConfigError for an invalid ``vm_id`` or ``slot``, before anything is
        made). Cancellation rolls back too, then propagates.
        """
        validate_vm_id(vm_id)
        if slot is not None:
            self.config.slot_addresses(slot)  # range check before anything is made
        made = _Made()
        try:
            return await self._build(vm_id, slot, made)
        except BaseException as exc:
            await self._rollback(vm_id, made, exc)
            if isinstance(exc, NetworkError) or not isinstance(exc, Exception):
                raise
            raise NetworkError(f"vm {vm_id}: network setup failed: {_describe(exc)}") from exc

    async def destroy(self, vm_id: str) -> None:
        """Remove one clone's host veth (taking its peer) and namespace. Idempotent.

        Stop the VMM first: the kernel frees the tap only once no process
        holds the namespace.
        """
        validate_vm_id(vm_id)
        await self._delete_host_veth(vm_id)
        with _step(vm_id, "remove namespace"):
            await asyncio.to_thread(remove_netns, self.config.netns_path(vm_id))
        self._release(vm_id)
        async with self._forward_lock:
            if vm_id in self._forwarding:
                self._forwarding.discard(vm_id)
                if not self._forwarding:
                    with _step(vm_id, "restore host ip_forward"):
                        await asyncio.to_thread(self._forward_lease.release)

    async def list_namespaces(self) -> list[str]:
        """vm_ids of this instance's clone namespaces on the host."""
        c = self.config
        names = await asyncio.to_thread(list_netns, c.netns_dir)
        return sorted(v for n in names if (v := c.vm_id_from(n, c.own_netns_prefix)))

    async def list_host_veths(self) -> list[str]:
        """vm_ids of this instance's clone host veth ends on the host."""
        c = self.config
        with _step(None, "list links"):
            async with AsyncIPRoute() as host:
                names = [link.get("ifname") async for link in await host.link("dump")]
        return sorted(v for n in names if n and (v := c.vm_id_from(n, c.own_veth_prefix)))

    # -- internals ---------------------------------------------------------------

    async def _build(self, vm_id: str, slot: int | None, made: _Made) -> CloneNetwork:
        c = self.config
        async with AsyncIPRoute() as host:
            slot = await self._allocate(host, vm_id, slot)
            made.slot = True
            host_if, ns_if = c.slot_addresses(slot)
            ns = await self._make_namespace(vm_id, made)
            try:
                # nft takes ~3 ms as a process; let it run while netlink plumbs.
                rules = asyncio.create_task(self._nft(nft.ns_ruleset(c, host_if.ip), vm_id))
                try:
                    await self._plumb_host(host, vm_id, ns, host_if, made)
                    await self._plumb_ns(vm_id, ns, host_if, ns_if)
                except BaseException:
                    rules.cancel()
                    await asyncio.wait([rules])
                    raise
                await rules
            finally:
                ns.close()
        return CloneNetwork(
            vm_id=vm_id,
            netns=c.netns_name(vm_id),
            netns_path=c.netns_path(vm_id),
            slot=slot,
            tap=c.tap,
            tap_address=c.tap_address.with_prefixlen,
            guest_address=c.guest_address.with_prefixlen,
            guest_gateway=str(c.tap_address.ip),
            host_veth=c.host_veth(vm_id),
            host_address=str(host_if.ip),
            ns_address=str(ns_if.ip),
            ns_veth=c.ns_veth,
            nsenter=c.nsenter,
        )

    async def _make_namespace(self, vm_id: str, made: _Made) -> NewNamespace:
        path = self.config.netns_path(vm_id)

        def orphan(ns: NewNamespace) -> None:
            made.netns = True
            ns.close()

        try:
            ns = await _in_own_thread(lambda: make_netns(path, self.config.tap), orphan)
        except NamespaceExists as exc:
            raise NetworkError(f"vm {vm_id}: namespace {path} already exists") from exc
        except OSError as exc:
            raise NetworkError(
                f"vm {vm_id}: create namespace {path} with tap {self.config.tap}: {exc}"
            ) from exc
        made.netns = True
        return ns

    async def _plumb_host(
        self,
        host: AsyncIPRoute,
        vm_id: str,
        ns: NewNamespace,
        host_if: IPv4Interface,
        made: _Made,
    ) -> None:
        name = self.config.host_veth(vm_id)
        with _step(vm_id, f"create veth {name}"):
            # The peer is born inside the namespace: no separate move.
            await host.link(
                "add",
                ifname=name,
                kind="veth",
                peer={"ifname": self.config.ns_veth, "net_ns_fd": ns.fd},
            )
        made.veth = True
        with _step(vm_id, f"configure {name}"):
            (index,) = await host.link_lookup(ifname=name)
            await host.addr(
                "add", index=index, address=str(host_if.ip), prefixlen=host_if.network.prefixlen
            )
            await host.link("set", index=index, state="up")
            # Strict reverse-path filter: a clone can only send from its own /30,
            # so a rogue guest can neither spoof others nor leak unNATed sources.
            await asyncio.to_thread(write_sysctl, f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "1")

    async def _plumb_ns(
        self, vm_id: str, ns: NewNamespace, host_if: IPv4Interface, ns_if: IPv4Interface
    ) -> None:
        c = self.config
        inner = AsyncIPRoute(use_socket=ns.netlink)
        try:
            with _step(vm_id, "bring up lo"):
                await inner.link("set", index=1, state="up")  # lo is always 1 in a new netns
            with _step(vm_id, f"configure {c.tap}"):
                await inner.addr(
                    "add",
                    index=ns.tap_index,
                    address=str(c.tap_address.ip),
                    prefixlen=c.tap_address.network.prefixlen,
                )
                await inner.link("set", index=ns.tap_index, state="up")
            with _step(vm_id, f"configure {c.ns_veth}"):
                (index,) = await inner.link_lookup(ifname=c.ns_veth)
                await inner.addr(
                    "add", index=index, address=str(ns_if.ip), prefixlen=ns_if.network.prefixlen
                )
                await inner.link("set", index=index, state="up")
                await inner.route("add", dst="0.0.0.0/0", gateway=str(host_if.ip), oif=index)
        finally:
            inner.close()

    async def _rollback(self, vm_id: str, made: _Made, exc: BaseException) -> None:
        try:
            if made.veth:
                await self._delete_host_veth(vm_id)
            if made.netns:
                with _step(vm_id, "remove namespace"):
                    await asyncio.to_thread(remove_netns, self.config.netns_path(vm_id))
        except Exception as err:
            exc.add_note(f"rollback failed, reconcile must remove the rest: {err}")
            log.error("net_rollback_failed", vm_id=vm_id, error=str(err))
        finally:
            if made.slot:
                self._release(vm_id)

    async def _delete_host_veth(self, vm_id: str) -> None:
        name = self.config.host_veth(vm_id)
        try:
            # Deleting one end deletes the pair: no need to enter the namespace.
            # The kernel does the work inside the sendmsg call, 15-35 ms of RCU
            # grace periods for a veth pair, so it must not run on the loop.
            await asyncio.to_thread(_delete_link, name)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise NetworkError(f"vm {vm_id}: delete veth {name}: {_describe(exc)}") from exc

    async def _allocate(self, host: AsyncIPRoute, vm_id: str, slot: int | None) -> int:
        with _step(vm_id, "list host addresses"):
            on_host = await self._slots_on_host(host)
        with self._lock:
            if vm_id in self._slots:
                raise NetworkError(
                    f"vm {vm_id}: already has a network in slot {self._slots[vm_id]}"
                )
            taken = on_host | set(self._slots.values())
            candidates = range(self.config.slots) if slot is None else [slot]
            for candidate in candidates:
                if candidate in taken:
                    continue
                fd = self._lock_slot(candidate)
                if fd is None:  # another instance on this host holds it
                    continue
                self._slots[vm_id] = candidate
                self._slot_fds[vm_id] = fd
                return candidate
            if slot is None:
                raise NetworkError(f"vm {vm_id}: all {self.config.slots} slots are in use")
            raise NetworkError(f"vm {vm_id}: slot {slot} is in use")

    def _lock_slot(self, slot: int) -> int | None:
        """Lock the slot's file (host-wide, per network namespace); None if held elsewhere.

        Tiny local file operations: done on the caller's thread.
        """
        netns = os.stat("/proc/thread-self/ns/net").st_ino
        directory = f"{self._lock_dir}/{netns}"
        os.makedirs(directory, mode=0o700, exist_ok=True)
        base = self.config.slot_addresses(slot)[0].network.network_address
        fd = os.open(f"{directory}/{base}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    async def _slots_on_host(self, host: AsyncIPRoute) -> set[int]:
        # Any pool address on any host interface: a previous daemon's clones keep
        # theirs, and a clash would make two veths claim the same /30.
        used: set[int] = set()
        async for msg in await host.addr("dump", family=socket.AF_INET):
            slot = self.config.slot_of(IPv4Address(msg.get("address")))
            if slot is not None:
                used.add(slot)
        return used

    def _release(self, vm_id: str) -> None:
        with self._lock:
            self._slots.pop(vm_id, None)
            fd = self._slot_fds.pop(vm_id, None)
        if fd is not None:
            os.close(fd)  # drops the flock; the file stays for the next clone

    async def _nft_out(self, args: list[str]) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.config.nft,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise NetworkError(f"nft {' '.join(args)}: {err.decode(errors='replace').strip()}")
        return out.decode()

    async def _nft(self, script: str, vm_id: str | None) -> None:
        """Apply one nft script on the host, or inside ``vm_id``'s namespace."""
        argv = [self.config.nft, "-f", "-"]
        if vm_id is not None:
            argv = [self.config.nsenter, f"--net={self.config.netns_path(vm_id)}", *argv]
        where = f"vm {vm_id}: " if vm_id else ""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NetworkError(f"{where}cannot run {argv[0]}: {exc}") from exc
        try:
            _, stderr = await proc.communicate(script.encode())
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            raise NetworkError(
                f"{where}nft failed with exit code {proc.returncode}: "
                f"{stderr.decode(errors='replace').strip()}"
            )
