"""nftables rulesets as text, for ``nft -f -``. Pure: no I/O.

Each ruleset first adds and deletes its table, then declares it anew, so one
``nft -f`` transaction replaces it atomically whether or not it existed
(nft 1.0.6 has no ``destroy table``).
"""

from __future__ import annotations

from runner.net.config import NetConfig


def _replace(family: str, table: str, body: str) -> str:
    return (
        f"add table {family} {table}\n"
        f"delete table {family} {table}\n"
        f"table {family} {table} {{\n{body}}}\n"
    )


def host_ruleset(config: NetConfig) -> str:
    """The host table: clone-to-clone isolation, plus egress NAT when enabled."""
    veths = f'"{config.host_veth_prefix}*"'
    body = (
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        # Clones share no L2; this stops them meeting at L3 through the host.
        f"    iifname {veths} oifname {veths} counter drop\n"
        "  }\n"
    )
    if config.egress:
        body += (
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {config.pool} oifname != {veths} masquerade\n"
            "  }\n"
        )
    return _replace("inet", config.host_table, body)


def host_teardown(config: NetConfig) -> str:
    """Remove the host table; harmless when it is already gone."""
    return f"add table inet {config.host_table}\ndelete table inet {config.host_table}\n"


def ns_ruleset(config: NetConfig) -> str:
    """The namespace table: the guest's address leaves as the namespace's veth address."""
    body = (
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{config.ns_veth}" masquerade\n'
        "  }\n"
    )
    # The namespace is brand new, so there is nothing to replace.
    return f"table ip {config.ns_table} {{\n{body}}}\n"
