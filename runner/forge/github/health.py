"""Per-profile backoff for runners whose VM ended without taking a job (no I/O).

A JIT runner that never picks up a job and exits points at something every
next runner will hit too: a retired runner version, a broken image, no
network to GitHub. Replacing it at once turns that into a hot loop against
the registration endpoint. So each such end doubles the profile's pause
before its next runner (capped), and after ``unhealthy_after`` ends in a row
the profile is reported unhealthy until one of its runners takes a job.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

LIKELY_CAUSE = (
    "the runner exited without taking a job: likely a runner version GitHub retired, "
    "a broken image, or no network from the VM to GitHub"
)


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to pause a profile after consecutive runners that took no job."""

    base_s: float = 5.0
    cap_s: float = 300.0
    unhealthy_after: int = 5

    def delay(self, failures: int) -> float:
        """The pause after ``failures`` consecutive ends without a job (0 → none)."""
        if failures <= 0:
            return 0.0
        return float(min(self.cap_s, self.base_s * 2.0 ** (failures - 1)))


class ProfileHealth:
    """Consecutive runner failures per profile, the pause they earn, and a total counter."""

    def __init__(
        self, policy: BackoffPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self._clock = clock
        self._streak: Counter[str] = Counter()
        self._until: dict[str, float] = {}
        self.failures_total: Counter[str] = Counter()
        """Runners that ended without a job, by profile, since start (a metric)."""

    def failed(self, profile: str) -> float:
        """A runner of ``profile`` ended without a job; returns the pause before the next."""
        self._streak[profile] += 1
        self.failures_total[profile] += 1
        delay = self.policy.delay(self._streak[profile])
        self._until[profile] = self._clock() + delay
        return delay

    def succeeded(self, profile: str) -> None:
        """A runner of ``profile`` took a job: the streak and the pause end."""
        self._streak.pop(profile, None)
        self._until.pop(profile, None)

    def wait_s(self, profile: str) -> float:
        """Seconds until ``profile`` may start another runner (0 = now)."""
        return max(0.0, self._until.get(profile, 0.0) - self._clock())

    def streak(self, profile: str) -> int:
        """Consecutive ends without a job."""
        return self._streak[profile]

    def unhealthy(self) -> dict[str, str]:
        """Profiles past ``unhealthy_after`` consecutive failures, with the reason to show."""
        limit = self.policy.unhealthy_after
        return {
            profile: f"{count} runners in a row ended without a job; {LIKELY_CAUSE}"
            for profile, count in sorted(self._streak.items())
            if count >= limit
        }
