"""Network settings and the per-clone network description.

Pure values: nothing here touches the host, so the daemon can validate its
configuration at start and compute names and addresses without root.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runner.errors import ConfigError

IFNAMSIZ = 15  # Linux interface names hold at most 15 bytes
VM_ID_MAX = 8
INSTANCE_LEN = 4
_INSTANCE = re.compile(rf"^[a-z0-9]{{{INSTANCE_LEN}}}$")
_VM_ID = re.compile(rf"^[a-z0-9]{{1,{VM_ID_MAX}}}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NFT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


def instance_id(state_dir: Path) -> str:
    """A short id naming everything one Snapfleet instance makes on the host.

    Derived from the instance's state directory: two instances (daemons, CLI
    runs, test sessions) with different state directories never share a name,
    and an instance restarted on the same directory recognises what it made.
    """
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).digest()
    return base64.b32encode(digest).decode().lower()[:INSTANCE_LEN]


def validate_vm_id(vm_id: str) -> str:
    """Return ``vm_id`` if it is 1-10 lowercase letters or digits, else raise ConfigError.

    The id ends up in interface and namespace names, which are short and
    must not carry shell or nft metacharacters.
    """
    if not _VM_ID.fullmatch(vm_id):
        raise ConfigError("vm_id", f"{vm_id!r} is not 1-{VM_ID_MAX} characters of [a-z0-9]")
    return vm_id


class NetConfig(BaseModel):
    """How clone networks are laid out. Validated once; immutable after."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance: str = Field("0000", pattern=_INSTANCE.pattern)
    """Whose clones these are (``instance_id`` of the state directory)."""
    netns_prefix: str = "sf-"
    netns_dir: str = "/run/netns"
    host_veth_prefix: str = "sfh"
    """Every Snapfleet instance's host veths start with this; the instance id follows."""
    ns_veth: str = "veth0"
    tap: str = "tap0"
    # The template guest's view: it was snapshotted with these, so every clone keeps them.
    tap_address: IPv4Interface = IPv4Interface("172.16.0.1/30")
    guest_address: IPv4Interface = IPv4Interface("172.16.0.2/30")
    # Each clone takes one /30 of this pool for its veth pair.
    pool: IPv4Network = IPv4Network("10.241.0.0/16")
    nameservers: tuple[IPv4Address, ...] = ()
    """The guests' resolvers: reachable on port 53 whatever a profile's egress."""
    allow_host_ports: tuple[int, ...] = ()
    """Host ports (TCP and UDP) guests may reach; everything else on the host is refused."""
    host_table: str = "snapfleet"
    """The instance's host table is this plus ``_<instance>``."""
    ns_table: str = "snapfleet"
    nft: str = "nft"
    nsenter: str = "nsenter"

    @model_validator(mode="after")
    def _check(self) -> Self:
        for key in ("ns_veth", "tap"):
            if not _IFNAME.fullmatch(getattr(self, key)):
                raise ValueError(f"{key}: not a valid interface name")
        longest = IFNAMSIZ - VM_ID_MAX - INSTANCE_LEN
        if not _IFNAME.fullmatch(self.host_veth_prefix) or len(self.host_veth_prefix) > longest:
            raise ValueError(f"host_veth_prefix: must be a name prefix of at most {longest}")
        if not _IFNAME.fullmatch(self.netns_prefix):
            raise ValueError("netns_prefix: not a valid name prefix")
        if any(not 0 < port < 65536 for port in self.allow_host_ports):
            raise ValueError("allow_host_ports: ports are 1-65535")
        for key in ("host_table", "ns_table"):
            if not _NFT_NAME.fullmatch(getattr(self, key)):
                raise ValueError(f"{key}: not a valid nftables table name")
        if self.tap_address.network != self.guest_address.network:
            raise ValueError("guest_address must be in the same subnet as tap_address")
        if self.tap_address.ip == self.guest_address.ip:
            raise ValueError("guest_address must differ from tap_address")
        if self.pool.prefixlen > 30:
            raise ValueError("pool must be at least a /30")
        if self.pool.overlaps(self.tap_address.network):
            raise ValueError("pool must not overlap the guest subnet")
        return self

    @property
    def slots(self) -> int:
        """How many clones the pool can hold at once (one /30 each)."""
        return int(self.pool.num_addresses // 4)

    def guest_kernel_args(self) -> str:
        """Kernel command-line parameters that configure the template guest's network."""
        return (
            f"snapfleet.ip={self.guest_address.with_prefixlen} snapfleet.gw={self.tap_address.ip}"
        )

    @property
    def own_netns_prefix(self) -> str:
        """What this instance's namespace names start with."""
        return f"{self.netns_prefix}{self.instance}-"

    @property
    def own_veth_prefix(self) -> str:
        """What this instance's host veth names start with."""
        return self.host_veth_prefix + self.instance

    @property
    def own_host_table(self) -> str:
        """This instance's nftables table on the host."""
        return f"{self.host_table}_{self.instance}"

    def netns_name(self, vm_id: str) -> str:
        """Namespace name of one clone."""
        return self.own_netns_prefix + validate_vm_id(vm_id)

    def netns_path(self, vm_id: str) -> str:
        """Bind-mount path of one clone's namespace (what ``ip netns`` uses)."""
        return f"{self.netns_dir}/{self.netns_name(vm_id)}"

    def host_veth(self, vm_id: str) -> str:
        """Host-side veth name of one clone."""
        return self.own_veth_prefix + validate_vm_id(vm_id)

    def slot_addresses(self, slot: int) -> tuple[IPv4Interface, IPv4Interface]:
        """(host end, namespace end) addresses of the /30 at ``slot``."""
        if not 0 <= slot < self.slots:
            raise ConfigError("slot", f"{slot} is outside 0..{self.slots - 1}")
        base = self.pool.network_address + 4 * slot
        return IPv4Interface(f"{base + 1}/30"), IPv4Interface(f"{base + 2}/30")

    def slot_of(self, address: IPv4Address) -> int | None:
        """Slot whose /30 holds ``address``, or None outside the pool."""
        if address not in self.pool:
            return None
        return (int(address) - int(self.pool.network_address)) // 4

    def vm_id_from(self, name: str, prefix: str) -> str | None:
        """The vm_id in a name made with ``prefix``, or None if it is not one of ours."""
        if not name.startswith(prefix):
            return None
        vm_id = name[len(prefix) :]
        return vm_id if _VM_ID.fullmatch(vm_id) else None


@dataclass(frozen=True)
class CloneNetwork:
    """What one clone's network looks like once ``NetworkManager.create`` returned."""

    vm_id: str
    netns: str
    netns_path: str
    slot: int
    tap: str
    tap_address: str  # "172.16.0.1/30": the guest's gateway, inside the namespace
    guest_address: str  # "172.16.0.2/30": what the template guest is configured with
    guest_gateway: str  # "172.16.0.1"
    host_veth: str
    host_address: str  # "10.241.0.1": the host side the guest can reach
    ns_address: str  # "10.241.0.2": guest traffic appears from here after NAT
    ns_veth: str
    nsenter: str = "nsenter"

    def exec_prefix(self) -> list[str]:
        """Argv prefix that starts a process (QEMU) inside this clone's namespace."""
        return [self.nsenter, f"--net={self.netns_path}", "--"]
