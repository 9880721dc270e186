"""A network namespace per VM clone.

Every clone resumes with the template's MAC and IP, so each one gets its own
namespace holding a tap with the template's name and address, joined to the
host by a veth pair, with NAT at the namespace edge::

    guest 172.16.0.2 ─ tap0 172.16.0.1 │ ns sf-<id>: masquerade out of veth0
                                        veth0 10.241.x.2 ─── sfh-<id> 10.241.x.1  (host)

On the host, one nftables table drops traffic between two clone veths and,
with ``egress``, masquerades the pool out of the host's own interfaces.

`NetworkManager` (which does that) is imported from `runner.net.manager`, not
from here: it needs pyroute2 (~125 ms of imports), and everything that reads the
configuration (`runner.config` uses `runner.net.policy`) imports this package.
"""

from runner.net.config import CloneNetwork, NetConfig, validate_vm_id

__all__ = ["CloneNetwork", "NetConfig", "validate_vm_id"]
