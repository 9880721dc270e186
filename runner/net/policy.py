"""What a clone's guest may reach: a profile's egress policy. Pure values.

Whatever the policy, the host itself (every address it has), link-local
addresses (the cloud metadata service among them) and other clones are out of
reach; the host tables enforce that. The policy decides the rest, in each
clone's own namespace:

* ``none``: nothing beyond the resolvers and the allow-list.
* ``internet``: public addresses, not the host's private networks.
* ``all``: any address except link-local, loopback and multicast.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Egress = Literal["none", "internet", "all"]

# Never reachable from a guest, in any mode (RFC 6890 special-purpose blocks
# that are not private LANs): "this network", loopback, link-local, multicast, reserved.
ALWAYS_BLOCKED: tuple[IPv4Network, ...] = tuple(
    IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)
# Blocked unless a profile's egress is "all": the networks a host usually lives in.
PRIVATE: tuple[IPv4Network, ...] = tuple(
    IPv4Network(n)
    for n in ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15")
)


class Allow(BaseModel):
    """One allow-list entry: a network, and optionally only some ports (TCP and UDP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cidr: IPv4Network
    ports: tuple[int, ...] = ()

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 0 < port < 65536 for port in value):
            raise ValueError("ports are 1-65535")
        return tuple(sorted(set(value)))


class EgressPolicy(BaseModel):
    """A profile's network policy, as the namespace's rules apply it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    egress: Egress = "internet"
    allow: tuple[Allow, ...] = Field(default_factory=tuple)

    def blocked(self, pool: IPv4Network) -> tuple[IPv4Network, ...]:
        """Destinations dropped after the allow-list and resolvers were let through."""
        if self.egress == "none":
            return ()  # the chain's policy drops everything anyway
        extra = PRIVATE if self.egress == "internet" else ()
        # nft refuses overlapping intervals in one set: merge them first.
        return tuple(collapse_addresses([*ALWAYS_BLOCKED, *extra, pool]))

    def forwards(self, nameservers: tuple[IPv4Address, ...]) -> bool:
        """Whether a clone under this policy needs the host to forward at all."""
        return self.egress != "none" or bool(self.allow) or bool(nameservers)
