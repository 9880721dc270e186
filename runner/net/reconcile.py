"""Reconcile decisions for clone networks. Pure: the daemon's loop does the I/O."""

from __future__ import annotations

from collections.abc import Iterable


def orphaned(
    known_vm_ids: Iterable[str], namespaces: Iterable[str], veths: Iterable[str]
) -> set[str]:
    """vm_ids that have a namespace or a host veth on the host but no VM the daemon knows.

    ``namespaces`` and ``veths`` are vm_ids as ``NetworkManager.list_namespaces``
    and ``list_host_veths`` return them; each orphan is for ``destroy``.
    """
    return (set(namespaces) | set(veths)) - set(known_vm_ids)
