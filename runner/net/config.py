"""Network settings and the per-clone network description.

Pure values: nothing here touches the host, so the daemon can validate its
configuration at start and compute names and addresses without root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from runner.errors import ConfigError

IFNAMSIZ = 15  # Linux interface names hold at most 15 bytes
VM_ID_MAX = 10
_VM_ID = re.compile(rf"^[a-z0-9]{{1,{VM_ID_MAX}}}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NFT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


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

    netns_prefix: str = "sf-"
    netns_dir: str = "/run/netns"
    host_veth_prefix: str = "sfh-"
    ns_veth: str = "veth0"
    tap: str = "tap0"
    # The template guest's view: it was snapshotted with these, so every clone keeps them.
    tap_address: IPv4Interface = IPv4Interface("172.16.0.1/30")
    guest_address: IPv4Interface = IPv4Interface("172.16.0.2/30")
    # Each clone takes one /30 of this pool for its veth pair.
    pool: IPv4Network = IPv4Network("10.241.0.0/16")
    # Masquerade clone traffic out of the host and turn on host ip_forward.
    egress: bool = True
    host_table: str = "snapfleet"
    ns_table: str = "snapfleet"
    nft: str = "nft"
    nsenter: str = "nsenter"

    @model_validator(mode="after")
    def _check(self) -> Self:
        for key in ("ns_veth", "tap"):
            if not _IFNAME.fullmatch(getattr(self, key)):
                raise ValueError(f"{key}: not a valid interface name")
        for key, prefix in (
            ("host_veth_prefix", self.host_veth_prefix),
            ("netns_prefix", self.netns_prefix),
        ):
            if not _IFNAME.fullmatch(prefix) or len(prefix) + VM_ID_MAX > IFNAMSIZ:
                raise ValueError(f"{key}: must be a name prefix of at most {IFNAMSIZ - VM_ID_MAX}")
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

    def netns_name(self, vm_id: str) -> str:
        """Namespace name of one clone."""
        return self.netns_prefix + validate_vm_id(vm_id)

    def netns_path(self, vm_id: str) -> str:
        """Bind-mount path of one clone's namespace (what ``ip netns`` uses)."""
        return f"{self.netns_dir}/{self.netns_name(vm_id)}"

    def host_veth(self, vm_id: str) -> str:
        """Host-side veth name of one clone."""
        return self.host_veth_prefix + validate_vm_id(vm_id)

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
