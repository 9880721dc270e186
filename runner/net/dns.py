"""The guests' resolvers: by default the host's own upstream servers.

``parse`` is pure. A host that runs systemd-resolved lists only its stub
(127.0.0.53) in /etc/resolv.conf; its real upstream servers are in
/run/systemd/resolve/resolv.conf. A loopback resolver is useless to a guest
(it would be the guest's own loopback), so it is left out with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from pathlib import Path

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
RESOLVED_STUB = IPv4Address("127.0.0.53")


@dataclass(frozen=True)
class Resolvers:
    """Nameservers for guests, and why others the host uses were left out."""

    nameservers: tuple[IPv4Address, ...]
    source: str
    skipped: tuple[str, ...] = field(default=())


def parse(text: str) -> list[str]:
    """The ``nameserver`` entries of a resolv.conf, in order."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            found.append(words[1])
    return found


def usable(entries: list[str], source: str) -> Resolvers:
    """Keep the IPv4, non-loopback entries (guests have IPv4 only)."""
    keep: list[IPv4Address] = []
    skipped: list[str] = []
    for entry in entries:
        try:
            address = ip_address(entry.split("%", 1)[0])
        except ValueError:
            skipped.append(f"{entry}: not an address")
            continue
        if not isinstance(address, IPv4Address):
            skipped.append(f"{entry}: guests have no IPv6")
        elif address.is_loopback:
            skipped.append(f"{entry}: a loopback resolver cannot serve guests")
        elif address not in keep:
            keep.append(address)
    return Resolvers(tuple(keep), source, tuple(skipped))


def host_resolvers(
    resolv_conf: Path = HOST_RESOLV_CONF, resolved_upstream: Path = RESOLVED_UPSTREAM
) -> Resolvers:
    """The host's upstream resolvers, looking through systemd-resolved's stub."""
    try:
        entries = parse(resolv_conf.read_text())
    except OSError as exc:
        return Resolvers((), str(resolv_conf), (f"cannot read {resolv_conf}: {exc.strerror}",))
    if str(RESOLVED_STUB) in entries:
        try:
            return usable(parse(resolved_upstream.read_text()), str(resolved_upstream))
        except OSError:
            pass  # no resolved running: fall through to what the file says
    return usable(entries, str(resolv_conf))

