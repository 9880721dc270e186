"""nftables rulesets as text, for ``nft -f -``. Pure: no I/O.

Each ruleset first adds and deletes its table, then declares it anew, so one
``nft -f`` transaction replaces it atomically whether or not it existed
(nft 1.0.6 has no ``destroy table``).

Two layers keep a guest in its lane:

* The host table of an instance (``snapfleet_<instance>``) matches that
  instance's host veths only. Input from them is dropped (no host service
  answers a guest, on any of the host's addresses) except ``allow_host_ports``;
  forwarding from them to any Snapfleet clone veth, to link-local addresses
  (the metadata service) and over IPv6 is dropped; what leaves is masqueraded.
* Each clone's namespace forwards nothing by default; ``ns_policy`` opens what
  the profile allows. The guest cannot touch either: both live in the host
  kernel, outside the VM.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from runner.net.config import NetConfig
from runner.net.policy import EgressPolicy

NS_EGRESS_CHAIN = "egress"


def _replace(family: str, table: str, body: str) -> str:
    return (
        f"add table {family} {table}\n"
        f"delete table {family} {table}\n"
        f"table {family} {table} {{\n{body}}}\n"
    )


def _set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def _dns_accept(nameservers: tuple[IPv4Address, ...]) -> str:
    if not nameservers:
        return ""
    return f"    ip daddr {_set(nameservers)} meta l4proto {{ tcp, udp }} th dport 53 accept\n"


def host_ruleset(config: NetConfig) -> str:
    """This instance's host table: no host services, no metadata, no clone-to-clone."""
    ours = f'"{config.own_veth_prefix}*"'
    any_clone = f'"{config.host_veth_prefix}*"'
    host_ports = ""
    if config.allow_host_ports:
        ports = _set(config.allow_host_ports)
        host_ports = f"    meta l4proto {{ tcp, udp }} th dport {ports} accept\n"
    body = (
        # Before the usual filter priority: an accept elsewhere cannot undo a drop here.
        "  chain input {\n"
        "    type filter hook input priority filter - 10; policy accept;\n"
        f"    iifname {ours} jump guest_to_host\n"
        "  }\n"
        "  chain guest_to_host {\n"
        f"{host_ports}"
        "    counter drop\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter - 10; policy accept;\n"
        f"    iifname {ours} jump guest_out\n"
        "  }\n"
        "  chain guest_out {\n"
        "    meta nfproto ipv6 counter drop\n"
        # Clones share no L2; this stops them meeting at L3 through the host,
        # whichever Snapfleet instance the other clone belongs to.
        f"    oifname {any_clone} counter drop\n"
        f"{_dns_accept(config.nameservers)}"
        "    ip daddr 169.254.0.0/16 counter drop\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    iifname {ours} oifname != {any_clone} masquerade\n"
        "  }\n"
    )
    return _replace("inet", config.own_host_table, body)


def host_teardown(config: NetConfig) -> str:
    """Remove the instance's host table; harmless when it is already gone."""
    table = config.own_host_table
    return f"add table inet {table}\ndelete table inet {table}\n"


def ns_ruleset(config: NetConfig, host_address: IPv4Address) -> str:
    """A new namespace's table: NAT out of its veth, and nothing forwarded yet.

    ``ns_policy`` fills the egress chain once the clone's profile is known;
    until then the forward chain's policy drops everything the guest sends.
    The host ports a guest may use are reached at its gateway address (the
    same in every clone), passed on to the host end of the clone's veth.
    """
    body = ""
    if config.allow_host_ports:
        body += (
            "  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n"
            f'    iifname "{config.tap}" ip daddr {config.tap_address.ip} '
            f"meta l4proto {{ tcp, udp }} th dport {_set(config.allow_host_ports)} "
            f"dnat to {host_address}\n"
            "  }\n"
        )
    body += (
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy drop;\n"
        "    ct state established,related accept\n"
        f'    iifname "{config.tap}" oifname "{config.ns_veth}" jump {NS_EGRESS_CHAIN}\n'
        "  }\n"
        f"  chain {NS_EGRESS_CHAIN} {{\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{config.ns_veth}" masquerade\n'
        "  }\n"
    )
    # The namespace is brand new, so there is nothing to replace.
    return f"table ip {config.ns_table} {{\n{body}}}\n"


def ns_policy(config: NetConfig, policy: EgressPolicy, host_address: IPv4Address) -> str:
    """Replace the egress chain of a clone's namespace with ``policy``'s rules.

    Order: the allow-list, the resolvers, then the blocked networks, then
    (unless egress is "none") everything else. ``host_address`` is the host end
    of the clone's veth, always blocked here besides the allowed host ports.
    """
    chain = f"ip {config.ns_table} {NS_EGRESS_CHAIN}"
    rules = [f"flush chain {chain}"]
    if config.allow_host_ports:
        ports = _set(config.allow_host_ports)
        rules.append(
            f"add rule {chain} ip daddr {host_address} meta l4proto {{ tcp, udp }} "
            f"th dport {ports} accept"
        )
    for entry in policy.allow:
        ports = f" meta l4proto {{ tcp, udp }} th dport {_set(entry.ports)}" if entry.ports else ""
        rules.append(f"add rule {chain} ip daddr {entry.cidr}{ports} accept")
    if config.nameservers:
        rules.append(
            f"add rule {chain} ip daddr {_set(config.nameservers)} "
            "meta l4proto { tcp, udp } th dport 53 accept"
        )
    blocked: tuple[IPv4Network, ...] = policy.blocked(config.pool)
    if blocked:
        rules.append(f"add rule {chain} ip daddr {_set(blocked)} counter drop")
    if policy.egress != "none":
        rules.append(f"add rule {chain} accept")
    return "\n".join(rules) + "\n"
