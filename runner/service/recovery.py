"""Reconcile records with what exists on the host.

``plan`` is a pure function over observed lists (VM directories, namespaces,
veths, QEMU processes) and what the daemon knows (live VMs, unfinished jobs);
``observe`` and ``apply`` do the I/O around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner.service.jobs import Job, JobState
from runner.vm import cgroup
from runner.vm.backend import Hypervisor
from runner.vm.ownership import is_lock_file, lock_path, owned_elsewhere

CgroupScope = tuple[Path, str]  # (cgroup root, instance id)

LOST_JOB_REASON = "the daemon stopped while the job ran; its VM was reclaimed"
SECRETS_LOST_REASON = (
    "the daemon restarted before this job started, and its secret env lived only in the old"
    " daemon's memory; submit it again"
)


@dataclass(frozen=True)
class Observed:
    """What exists on the host that Snapfleet may have made."""

    vm_dirs: frozenset[str] = frozenset()
    netns: frozenset[str] = frozenset()
    veths: frozenset[str] = frozenset()
    qemu: Mapping[str, int] = field(default_factory=dict)  # VMM processes: vm_id -> pid
    owned: frozenset[str] = frozenset()
    """VM ids whose lock another live process (or another part of this one) holds."""
    cgroups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Plan:
    """What to reclaim and which jobs to end."""

    kill: Mapping[str, int] = field(default_factory=dict)
    networks: frozenset[str] = frozenset()
    dirs: frozenset[str] = frozenset()
    cgroups: frozenset[str] = frozenset()
    fail_jobs: tuple[str, ...] = ()
    release_leases: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.kill or self.networks or self.dirs or self.cgroups or self.fail_jobs
                    or self.release_leases)


def plan(
    observed: Observed,
    live_vms: Iterable[str],
    unfinished: Mapping[str, JobState],
    live_jobs: Iterable[str],
    leases: Iterable[str],
) -> Plan:
    """Decide what to reclaim.

    * A VM id seen on the host (directory, namespace, veth or QEMU process) that
      no live machine of this daemon owns and no live process holds the lock of
      is an orphan: kill, remove, delete. Only this instance's names are seen.
    * A job the store says is starting or running but no task of this daemon
      runs was lost (the daemon died): it ends as a system failure.
    * Queued jobs are left alone: they never started, so they can still run.
    """
    live = set(live_vms)
    seen = (observed.vm_dirs | observed.netns | observed.veths | observed.cgroups
            | set(observed.qemu))
    orphans = seen - live - observed.owned
    running = set(live_jobs)
    lost = tuple(
        job_id for job_id, state in sorted(unfinished.items())
        if state in (JobState.STARTING, JobState.RUNNING) and job_id not in running
    )
    return Plan(
        kill={vm: pid for vm, pid in observed.qemu.items() if vm in orphans},
        networks=frozenset((observed.netns | observed.veths) & orphans),
        dirs=frozenset(observed.vm_dirs & orphans),
        cgroups=frozenset(observed.cgroups & orphans),
        fail_jobs=lost,
        release_leases=frozenset(set(leases) - live),
    )


async def observe(hv: Hypervisor, cgroups: CgroupScope | None = None) -> Observed:
    """Look at the host: this instance's VMs, and which of them a live process owns.

    Locks are checked after everything else is listed: an owner takes its lock
    before it makes anything, so whatever was listed and has a free lock is an orphan.
    """
    vms_dir, net = hv.vms_dir, hv.net_manager
    dirs = await asyncio.to_thread(_vm_dirs, vms_dir)
    netns: frozenset[str] = frozenset()
    veths: frozenset[str] = frozenset()
    if net is not None:
        netns = frozenset(await net.list_namespaces())
        veths = frozenset(await net.list_host_veths())
    qemu = await asyncio.to_thread(hv.processes)
    groups: frozenset[str] = frozenset()
    if cgroups is not None:
        groups = frozenset(await asyncio.to_thread(cgroup.list_groups, *cgroups))
    seen = dirs | netns | veths | groups | set(qemu)
    owned = frozenset(v for v in seen if owned_elsewhere(vms_dir, v))
    return Observed(
        vm_dirs=dirs, netns=netns, veths=veths, qemu=qemu, owned=owned, cgroups=groups
    )


def _vm_dirs(vms_dir: Path) -> frozenset[str]:
    if not vms_dir.exists():
        return frozenset()
    return frozenset(p.name for p in vms_dir.iterdir() if not is_lock_file(p.name))


async def apply(the_plan: Plan, hv: Hypervisor, cgroups: CgroupScope | None = None) -> list[str]:
    """Carry out the reclaiming part of a plan; returns problems (never raises)."""
    vms_dir, net = hv.vms_dir, hv.net_manager
    problems: list[str] = []
    for vm_id, pid in the_plan.kill.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):  # not our child: poll until it is gone
            if not Path(f"/proc/{pid}").exists():
                break
            await asyncio.sleep(0.02)
        else:
            problems.append(f"QEMU pid {pid} of orphan VM {vm_id} survived SIGKILL")
    if net is not None:
        for vm_id in sorted(the_plan.networks):
            try:
                await net.destroy(vm_id)
            except Exception as exc:
                problems.append(f"removing network of orphan VM {vm_id}: {exc}")
    for vm_id in sorted(the_plan.dirs):
        try:
            await asyncio.to_thread(shutil.rmtree, vms_dir / vm_id)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"removing {vms_dir / vm_id}: {exc}")
    if cgroups is not None:
        for vm_id in sorted(the_plan.cgroups):
            made = cgroup.groups(*cgroups, vm_id)
            problems += await asyncio.to_thread(cgroup.remove, made)
    for vm_id in sorted(set(the_plan.kill) | the_plan.networks | the_plan.dirs):
        with contextlib.suppress(FileNotFoundError):
            lock_path(vms_dir, vm_id).unlink()
    return problems


def secrets_lost(job: Job) -> str | None:
    """Why a queued job found at startup cannot run as submitted, or None if it can.

    Secret env is never stored, so a job queued before a restart has the names of
    its secrets but not their values: run without them it would fail in some
    confusing way (or worse, run unauthenticated), so it ends here with the reason.
    """
    if not job.secrets_lost:
        return None
    return f"{SECRETS_LOST_REASON} (secret env: {', '.join(job.secrets_lost)})"
