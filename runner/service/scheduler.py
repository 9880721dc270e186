"""Scheduling decisions as pure functions: which profile, does it fit, what runs next."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runner.config import Profile, Settings
from runner.errors import ConfigError


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


def pick(
    queue: Sequence[tuple[str, Resources]], free: Resources, free_slots: int
) -> list[str]:
    """Jobs to start now, strictly first in, first out.

    Stops at the first job that does not fit, so a big job at the head is never
    overtaken (and starved) by a stream of small ones.
    """
    chosen = []
    for job_id, need in queue:
        if free_slots <= 0 or not need.fits_in(free):
            break
        chosen.append(job_id)
        free = free - need
        free_slots -= 1
    return chosen


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
