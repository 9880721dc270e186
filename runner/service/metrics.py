"""Prometheus metrics: what the daemon records, and the ``GET /metrics`` endpoint.

Metrics live in a private ``CollectorRegistry`` so that two daemons in one
process (tests) never share counters, and nothing else in the process (aiohttp,
libraries) lands on our endpoint by accident. Labelled series the daemon knows
about up front are created at zero, so ``rate()`` and alerts see them before
the first event.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from runner import __version__
from runner.errors import ConfigError, HostError

log = structlog.get_logger("snapfleet.metrics")

_KEY = "daemon.metrics_listen"

OUTCOMES: Final = ("succeeded", "failed", "timed_out", "cancelled", "system_failure", "refused")
"""Values of ``snapfleet_jobs_total{outcome}``."""
RECOVERY_KINDS: Final = (
    "orphan_vm",
    "orphan_network",  # a namespace and/or host veth, when the daemon does not tell them apart
    "orphan_netns",
    "orphan_veth",
    "orphan_dir",
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

    def observe_restore(self, seconds: float, *, warm: bool) -> None:
        """How long one restore took, from a warm pool VMM or a freshly spawned one."""
        self.restore.labels(pool="warm" if warm else "cold").observe(seconds)

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


@dataclass(frozen=True)
class TCPListen:
    """``host:port``."""

    host: str
    port: int


@dataclass(frozen=True)
class UnixListen:
    """``unix:/path``."""

    path: Path


def parse_listen(listen: str) -> TCPListen | UnixListen | None:
    """Parse ``daemon.metrics_listen``; None when empty (disabled).

    ``host:port`` (IPv6 hosts in brackets: ``[::1]:9464``) or ``unix:/abs/path``.
    ConfigError naming ``daemon.metrics_listen`` says what is wrong.
    """
    if listen == "":
        return None
    if listen.startswith("unix:"):
        return UnixListen(_unix_path(listen.removeprefix("unix:")))
    if "/" in listen or any(c.isspace() for c in listen):
        raise ConfigError(_KEY, f"{listen!r} is neither host:port nor unix:/path")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(_KEY, f"{listen!r} needs host:port, e.g. 127.0.0.1:9464 or 0.0.0.0:9464")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ConfigError(_KEY, f"port {port_text!r} in {listen!r} is not a number 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(_KEY, f"{host!r} in {listen!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(_KEY, f"put the IPv6 address in {listen!r} in brackets: [addr]:port")
    elif not all(c.isalnum() or c in "-._" for c in host):
        raise ConfigError(_KEY, f"{host!r} in {listen!r} is not a host name or address")
    return TCPListen(host, int(port_text))


def _unix_path(text: str) -> Path:
    if not text.startswith("/"):
        raise ConfigError(_KEY, f"unix socket path {text!r} must be absolute")
    if "\0" in text:
        raise ConfigError(_KEY, "unix socket path contains a NUL byte")
    # sun_path holds 108 bytes including the terminating NUL.
    if len(os.fsencode(text)) > 107:
        raise ConfigError(_KEY, f"unix socket path {text!r} is longer than 107 bytes")
    if text.endswith("/"):
        raise ConfigError(_KEY, f"unix socket path {text!r} names a directory")
    return Path(text)


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
    where = parse_listen(listen)
    if where is None:
        yield None
        return
    gid = _group_id(group)
    app = web.Application()
    app.router.add_get("/metrics", _handler(metrics))
    # Scrapes every few seconds would flood the journal with access lines.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    bound: os.stat_result | None = None
    try:
        if isinstance(where, UnixListen):
            sock = await _unix_socket(where.path, gid)
            bound = os.stat(where.path)
            site: web.BaseSite = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, where.host, where.port)
        try:
            await site.start()
        except OSError as exc:
            raise HostError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        address = _describe(runner, where)
        log.info("serving metrics", listen=address)
        yield address
    finally:
        await runner.cleanup()
        if isinstance(where, UnixListen) and bound is not None:
            _remove_own_socket(where.path, bound)


def _handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_request: web.Request) -> web.Response:
        # Rendering is microseconds of CPU for our few dozen series: no thread needed.
        return web.Response(
            body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )

    return handle


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("daemon.api_group", f"group {group!r} does not exist") from None


async def _unix_socket(path: Path, gid: int | None) -> socket.socket:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    await _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Mode (and group) are set before listen(): until then connects are
        # refused, so there is no moment when the socket is open to everyone.
        os.chmod(path, 0o660)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HostError(f"cannot serve metrics on unix:{path}: {exc.strerror or exc}") from exc
    return sock


async def _remove_stale(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(_KEY, f"{path} exists and is not a socket; refusing to replace it")
    try:
        # A unix connect is answered (or refused) at once: no thread needed.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        finally:
            probe.close()
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left behind by a process that died
        return
    raise HostError(f"metrics socket {path} is in use by another process")


def _remove_own_socket(path: Path, bound: os.stat_result) -> None:
    # Only ours: a successor may already have replaced it.
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino):
            path.unlink()


def _describe(runner: web.AppRunner, where: TCPListen | UnixListen) -> str:
    if isinstance(where, UnixListen):
        return f"unix:{where.path}"
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = str(addr[0]), int(addr[1])
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{where.host}:{where.port}"
