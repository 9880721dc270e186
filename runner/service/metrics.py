"""Prometheus metrics: what the daemon records, and the ``GET /metrics`` endpoint.

Metrics live in a private ``CollectorRegistry`` so that two daemons in one
process (tests) never share counters, and nothing else in the process (aiohttp,
libraries) lands on our endpoint by accident. Labelled series the daemon knows
about up front are created at zero, so ``rate()`` and alerts see them before
the first event.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from runner import __version__
from runner.errors import HostError
from runner.listen import UnixListen, bind_unix, describe, group_id, parse_listen, remove_own_socket

log = structlog.get_logger("snapfleet.metrics")

_KEY = "daemon.metrics_listen"

OUTCOMES: Final = ("succeeded", "failed", "timed_out", "cancelled", "system_failure", "refused")
"""Values of ``snapfleet_jobs_total{outcome}``."""
RECOVERY_KINDS: Final = (
    "orphan_vm",
    "orphan_network",  # a namespace and/or host veth
    "orphan_dir",
    "orphan_cgroup",
    "lost_job",
)
"""Kinds of ``snapfleet_recoveries_total`` created at zero (others are accepted too)."""
RESOURCES: Final = ("vcpus", "memory_mib", "gpus", "slots")
"""Values of ``snapfleet_capacity{resource}``."""

# Restores take ~0.2 s warm under TCG and up to seconds cold or under load.
RESTORE_BUCKETS: Final = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
# Queue waits range from nothing (idle host) to hours (saturated host).
QUEUE_WAIT_BUCKETS: Final = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 7200)


class ResourceAmounts(Protocol):
    """What ``set_capacity`` reads (the scheduler's ``Resources`` fits)."""

    @property
    def vcpus(self) -> int: ...

    @property
    def memory_mib(self) -> int: ...

    @property
    def gpus(self) -> int: ...


class Metrics:
    """Every metric the daemon exports, with plain methods to update them."""

    def __init__(self, *, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs_total = Counter(
            "snapfleet_jobs", "Jobs that ended, by outcome.", ["outcome"], registry=r
        )
        # Not "snapfleet_jobs{state}": that family name belongs to the counter
        # above (snapfleet_jobs_total), and prometheus_client refuses both.
        self.jobs = Gauge(
            "snapfleet_jobs_current", "Unfinished jobs, by state.", ["state"], registry=r
        )
        self.queue_wait = Histogram(
            "snapfleet_queue_wait_seconds",
            "Time from submission until a job got capacity.",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.restore = Histogram(
            "snapfleet_restore_seconds",
            "Time to restore a VM from its snapshot until the agent answered.",
            ["pool"],
            buckets=RESTORE_BUCKETS,
            registry=r,
        )
        self.vms_running = Gauge("snapfleet_vms_running", "VMs alive right now.", registry=r)
        self.capacity = Gauge(
            "snapfleet_capacity",
            "What this host lends to jobs (total) and what is lent out (used).",
            ["resource", "kind"],
            registry=r,
        )
        self.recoveries = Counter(
            "snapfleet_recoveries",
            "Things reconciling found and reclaimed (orphans) or ended (lost jobs).",
            ["kind"],
            registry=r,
        )
        self.pool_idle = Gauge(
            "snapfleet_pool_idle",
            "Warm VMM processes waiting, by profile.",
            ["profile"],
            registry=r,
        )
        self.gpus = Gauge(
            "snapfleet_gpus",
            "GPU devices [gpu] hands out, by state (free, leased, quarantined).",
            ["state"],
            registry=r,
        )
        self.gpu_quarantines = Gauge(
            "snapfleet_gpu_quarantine_events",
            "Devices quarantined (failed reset or rebind) since the daemon started.",
            registry=r,
        )
        self.build_info = Gauge(
            "snapfleet_build_info",
            "Always 1; the labels say what is running.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version=version).set(1)
        for outcome in OUTCOMES:
            self.jobs_total.labels(outcome=outcome)
        for state in ("queued", "running"):
            self.jobs.labels(state=state)
        for pool in ("warm", "cold"):
            self.restore.labels(pool=pool)
        for resource in RESOURCES:
            for kind in ("total", "used"):
                self.capacity.labels(resource=resource, kind=kind)
        for recovery in RECOVERY_KINDS:
            self.recoveries.labels(kind=recovery)

    def job_finished(self, outcome: str) -> None:
        """Count one job that ended (or was refused); ValueError for an unknown outcome."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown job outcome {outcome!r} (known: {', '.join(OUTCOMES)})")
        self.jobs_total.labels(outcome=outcome).inc()

    def set_jobs(self, *, queued: int, running: int) -> None:
        """Unfinished jobs: waiting for capacity, and holding it."""
        self.jobs.labels(state="queued").set(queued)
        self.jobs.labels(state="running").set(running)

    def observe_queue_wait(self, seconds: float) -> None:
        """How long one job waited before it was started."""
        self.queue_wait.observe(max(0.0, seconds))

    def observe_restore(self, seconds: float, *, pool: str) -> None:
        """How long one restore took: ``hot`` (assigned), ``warm`` (a waiting VMM) or ``cold``."""
        self.restore.labels(pool=pool).observe(seconds)

    def set_vms(self, running: int) -> None:
        """VMs alive right now (jobs' VMs; warm pool VMMs are ``pool_idle``)."""
        self.vms_running.set(running)

    def set_capacity(
        self, total: ResourceAmounts, used: ResourceAmounts, slots_total: int, slots_used: int
    ) -> None:
        """Capacity lent and lent out: vCPUs, guest MiB, GPUs and concurrency slots."""
        for kind, amounts, slots in (("total", total, slots_total), ("used", used, slots_used)):
            self.capacity.labels(resource="vcpus", kind=kind).set(amounts.vcpus)
            self.capacity.labels(resource="memory_mib", kind=kind).set(amounts.memory_mib)
            self.capacity.labels(resource="gpus", kind=kind).set(amounts.gpus)
            self.capacity.labels(resource="slots", kind=kind).set(slots)

    def set_gpus(self, stats: dict[str, int]) -> None:
        """The GPU allocator's counts (`GpuAllocator.stats`)."""
        for state in ("free", "leased", "quarantined"):
            self.gpus.labels(state=state).set(stats.get(state, 0))
        self.gpu_quarantines.set(stats.get("quarantine_events", 0))

    def recovered(self, kind: str, count: int = 1) -> None:
        """Count ``count`` things of one kind that reconciling reclaimed or ended."""
        if count > 0:
            self.recoveries.labels(kind=kind).inc(count)

    def set_pool_idle(self, profile: str, idle: int) -> None:
        """Warm VMMs of one profile that are waiting for a restore."""
        self.pool_idle.labels(profile=profile).set(idle)

    def render(self) -> bytes:
        """Everything in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)


# -- the endpoint --------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_metrics(
    metrics: Metrics, listen: str, *, group: str | None = None
) -> AsyncIterator[str | None]:
    """Serve ``GET /metrics`` on ``listen`` for as long as the context is open.

    Yields where it listens (``host:port`` with the real port, or
    ``unix:/path``), or None when ``listen`` is empty. A unix socket gets mode
    0660 (group ``group`` when given, e.g. ``daemon.api_group``) in a parent
    directory created 0755; a stale socket there is replaced, and the socket
    is removed on exit. ConfigError for a malformed ``listen``, HostError when
    the address cannot be had (in use, no permission).
    """
    where = parse_listen(listen, _KEY)
    if where is None:
        yield None
        return
    gid = group_id(group)
    app = web.Application()
    app.router.add_get("/metrics", _handler(metrics))
    # Scrapes every few seconds would flood the journal with access lines.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    bound: os.stat_result | None = None
    try:
        if isinstance(where, UnixListen):
            sock = bind_unix(where.path, gid=gid, mode=0o660, what="metrics", key=_KEY)
            bound = os.stat(where.path)
            site: web.BaseSite = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, where.host, where.port)
        try:
            await site.start()
        except OSError as exc:
            raise HostError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        address = describe(runner, where)
        log.info("serving metrics", listen=address)
        yield address
    finally:
        await runner.cleanup()
        if isinstance(where, UnixListen) and bound is not None:
            remove_own_socket(where.path, bound)


def _handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_request: web.Request) -> web.Response:
        # Rendering is microseconds of CPU for our few dozen series: no thread needed.
        return web.Response(
            body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    return handle
