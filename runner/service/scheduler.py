"""Scheduling decisions as pure functions: which profile, does it fit, what runs next."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.config import Profile, Settings
from runner.errors import ConfigError
from runner.gpu.config import GpuRequest

Unit = tuple[str, str]
"""A GPU unit the allocator could hand out: (id, model)."""


@dataclass(frozen=True)
class Resources:
    """vCPUs, guest memory and GPU slots."""

    vcpus: int = 0
    memory_mib: int = 0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.vcpus + other.vcpus, self.memory_mib + other.memory_mib,
                         self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.vcpus - other.vcpus, self.memory_mib - other.memory_mib,
                         self.gpus - other.gpus)

    def fits_in(self, other: Resources) -> bool:
        return (self.vcpus <= other.vcpus and self.memory_mib <= other.memory_mib
                and self.gpus <= other.gpus)


def demand(profile: Profile) -> Resources:
    return Resources(profile.vcpus, profile.memory_mib, profile.gpus)


def host_capacity(settings: Settings, meminfo: Path = Path("/proc/meminfo")) -> Resources:
    """Configured capacity, defaulting to the host's CPUs and 80% of its memory."""
    cap = settings.capacity
    vcpus = cap.vcpus or os.cpu_count() or 1
    memory = cap.memory_mib
    if memory is None:
        total_kib = 0
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total_kib = int(line.split()[1])
        memory = int(total_kib / 1024 * 0.8)
    return Resources(vcpus, memory, cap.gpus)


def choose_profile(settings: Settings, profile: str | None, labels: Sequence[str]) -> str:
    """The profile a job runs in; ConfigError with the reason when none serves it.

    An explicit profile wins. Otherwise the first profile (in config order) whose
    labels include all of the job's labels; with no labels, the default profile.
    """
    if profile is not None:
        settings.profile(profile)  # raises for unknown names
        return profile
    if not labels:
        return settings.default_profile
    wanted = set(labels)
    for name, candidate in settings.profiles.items():
        if wanted <= set(candidate.labels):
            return name
    raise ConfigError("labels", f"no profile serves labels {sorted(wanted)}")


def refusal(need: Resources, total: Resources) -> str | None:
    """Why a job can never run on this host, or None if it can."""
    if need.fits_in(total):
        return None
    return (f"needs {need.vcpus} vCPU / {need.memory_mib} MiB / {need.gpus} GPU but this host"
            f" lends at most {total.vcpus} / {total.memory_mib} MiB / {total.gpus}")


def gpu_capacity(configured: int, units: int) -> int:
    """GPUs this host lends: the allocator's units, lowered by `capacity.gpus` when set."""
    return units if configured == 0 else min(configured, units)


def gpu_refusal(request: GpuRequest | None, units: Sequence[Unit]) -> str | None:
    """Why a GPU request can never be served by ``units`` (all of them, free or not)."""
    if request is None or request.model is None:
        return None
    have = sum(model == request.model for _, model in units)
    if have >= request.count:
        return None
    return f"needs {request} but this host hands out {have} of that model"


def choose_gpus(request: GpuRequest, free: Sequence[Unit]) -> tuple[str, ...] | None:
    """The free units (first ones, in the allocator's order) for ``request``, or None."""
    fitting = [uid for uid, model in free if request.model in (None, model)]
    return tuple(fitting[:request.count]) if len(fitting) >= request.count else None


def plan_starts(
    queue: Sequence[tuple[str, Resources, GpuRequest | None]],
    free: Resources,
    free_slots: int,
    units: Sequence[Unit] = (),
) -> list[tuple[str, tuple[str, ...]]]:
    """Jobs to start now, with the GPU units each gets, strictly first in, first out.

    Stops at the first job that does not fit (capacity, or no free unit of the
    model it asks for), so a big job at the head is never overtaken (and
    starved) by a stream of small ones.
    """
    chosen: list[tuple[str, tuple[str, ...]]] = []
    available = list(units)
    for job_id, need, request in queue:
        if free_slots <= 0 or not need.fits_in(free):
            break
        taken: tuple[str, ...] = ()
        if request is not None:
            found = choose_gpus(request, available)
            if found is None:
                break
            taken = found
            available = [u for u in available if u[0] not in taken]
        chosen.append((job_id, taken))
        free = free - need
        free_slots -= 1
    return chosen


def pick(
    queue: Sequence[tuple[str, Resources]], free: Resources, free_slots: int
) -> list[str]:
    """Jobs to start now (no GPU models involved): `plan_starts` without units."""
    return [job_id for job_id, _ in plan_starts([(j, n, None) for j, n in queue], free,
                                                free_slots)]


def room(
    need: Resources, free: Resources, free_slots: int, queued: Sequence[Resources]
) -> int:
    """How many more jobs needing ``need`` could start, after the queued jobs ahead of them.

    The queue runs first in, first out, so what it asks for comes off first; then
    count how many ``need`` fit in what is left. A source that asks before taking
    work (GitHub's scale sets) takes no more than this.
    """
    for ahead in queued:
        free = free - ahead
        free_slots -= 1
    count = 0
    while count < free_slots and need.fits_in(free):
        free = free - need
        count += 1
    return count


def wait_reason(
    queue: Sequence[tuple[str, Resources, GpuRequest | None]],
    job_id: str,
    free: Resources,
    free_slots: int,
    units: Sequence[Unit] = (),
) -> str | None:
    """Why the queued job ``job_id`` has not started, in words; None if it is not queued
    or nothing holds it back (it starts on the scheduler's next pass)."""
    ids = [jid for jid, _, _ in queue]
    if job_id not in ids:
        return None
    ahead = ids.index(job_id)
    if ahead:
        return f"{ahead} job{'s' if ahead > 1 else ''} ahead of it in the queue"
    _, need, request = queue[0]
    if free_slots <= 0:
        return "every job slot is busy (capacity.max_concurrency)"
    if not need.fits_in(free):
        return (f"needs {need.vcpus} vCPU / {need.memory_mib} MiB / {need.gpus} GPU, and"
                f" {max(free.vcpus, 0)} / {max(free.memory_mib, 0)} MiB / {max(free.gpus, 0)}"
                " are free until running jobs end")
    if request is not None and choose_gpus(request, units) is None:
        return f"waiting for a free GPU ({request})"
    return None
