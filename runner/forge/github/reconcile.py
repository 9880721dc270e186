"""What the GitHub reconcile loop should do, decided without I/O.

GitHub binds no runner to the job that caused it: any idle runner whose
labels match takes any queued job. So the loop compares counts per profile
(queued jobs vs. runners not yet busy), not job ids, and it cleans up
registrations and VMs that will never take a job. The loop around ``plan``
lists runners and jobs, calls ``plan``, then does what it says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from runner.forge.github.types import Runner


@dataclass(frozen=True)
class RoutedJob:
    """A queued job and the profile that serves its labels (``None``: none of ours does)."""

    job_id: int
    profile: str | None


@dataclass(frozen=True)
class LiveVM:
    """A VM this host runs (or is starting) for one JIT runner.

    Record it *before* calling ``generate_jitconfig``, so a fresh registration
    is never mistaken for an orphan.
    """

    vm_id: str
    runner_name: str
    profile: str
    started_at: float
    took_job: bool
    """The runner in the guest reported that it picked up a job."""


@dataclass(frozen=True)
class Teardown:
    """An idle VM to destroy, after deleting its registration ``runner_id`` (if listed)."""

    vm_id: str
    runner_name: str
    runner_id: int | None


@dataclass(frozen=True)
class Plan:
    """The decisions of one reconcile pass."""

    start: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Profile name → runners (VMs) to start."""
    delete_runners: tuple[int, ...] = ()
    """Our offline registrations with no VM behind them."""
    destroy_vms: tuple[Teardown, ...] = ()
    """VMs whose runner took no job within the idle limit. Delete the registration
    first; if GitHub answers 422 (it just took a job), keep the VM."""


def runner_prefix(name_prefix: str, host: str) -> str:
    """The name prefix of this host's runners, ``<name_prefix>-<host>-``."""
    return f"{name_prefix}-{host}-"


def plan(
    *,
    queued: Iterable[RoutedJob],
    runners: Iterable[Runner],
    vms: Iterable[LiveVM],
    now: float,
    idle_limit_s: float,
    prefix: str,
) -> Plan:
    """Decide what to start, which registrations to delete and which VMs to destroy.

    ``runners`` is everything GitHub lists; only names starting with
    ``prefix`` (this host's) are considered. A VM's runner counts as
    available until it takes a job (the VM says so, or GitHub shows it busy).
    """
    ours = {r.name: r for r in runners if r.name.startswith(prefix)}
    vms = list(vms)
    with_vm = {vm.runner_name for vm in vms}

    available: Counter[str] = Counter()
    teardown: list[Teardown] = []
    for vm in vms:
        runner = ours.get(vm.runner_name)
        if vm.took_job or (runner is not None and runner.busy):
            continue
        if now - vm.started_at >= idle_limit_s:
            teardown.append(Teardown(vm.vm_id, vm.runner_name, runner.id if runner else None))
        else:
            available[vm.profile] += 1

    demand = Counter(job.profile for job in queued if job.profile is not None)
    start = {p: n - available[p] for p, n in sorted(demand.items()) if n > available[p]}
    orphans = sorted(
        r.id
        for r in ours.values()
        if r.status == "offline" and not r.busy and r.name not in with_vm
    )
    return Plan(
        start=MappingProxyType(start),
        delete_runners=tuple(orphans),
        destroy_vms=tuple(sorted(teardown, key=lambda t: t.vm_id)),
    )
