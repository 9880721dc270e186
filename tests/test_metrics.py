"""Prometheus metrics: exact values over a real HTTP endpoint (TCP and unix socket)."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from runner import __version__
from runner.errors import ConfigError, HostError
from runner.listen import TCPListen, UnixListen, parse_listen
from runner.service.metrics import OUTCOMES, Metrics, serve_metrics

KEY = "daemon.metrics_listen"


@dataclass(frozen=True)
class Res:
    vcpus: int
    memory_mib: int
    gpus: int


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by name and labels; the text must parse."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def exercise(m: Metrics) -> None:
    m.job_finished("succeeded")
    m.job_finished("succeeded")
    m.job_finished("refused")
    m.set_jobs(queued=3, running=2)
    m.observe_queue_wait(0.3)
    m.observe_queue_wait(45.0)
    m.observe_restore(0.21, pool="warm")
    m.observe_restore(0.08, pool="warm")
    m.observe_restore(2.0, pool="cold")
    m.set_vms(2)
    m.set_capacity(Res(8, 16384, 1), Res(2, 1024, 0), slots_total=8, slots_used=2)
    m.recovered("orphan_network", 2)
    m.recovered("lost_job")
    m.recovered("orphan_dir", 0)
    m.set_pool_idle("default", 4)


async def scrape(url: str, connector: aiohttp.BaseConnector | None = None) -> tuple[str, str]:
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as response,
    ):
        assert response.status == 200
        return response.headers["Content-Type"], await response.text()


def check_values(text: str) -> None:
    assert value(text, "snapfleet_jobs_total", outcome="succeeded") == 2
    assert value(text, "snapfleet_jobs_total", outcome="refused") == 1
    for outcome in set(OUTCOMES) - {"succeeded", "refused"}:
        assert value(text, "snapfleet_jobs_total", outcome=outcome) == 0  # present at zero
    assert value(text, "snapfleet_jobs_current", state="queued") == 3
    assert value(text, "snapfleet_jobs_current", state="running") == 2
    assert value(text, "snapfleet_queue_wait_seconds_count") == 2
    assert value(text, "snapfleet_queue_wait_seconds_sum") == pytest.approx(45.3)
    assert value(text, "snapfleet_queue_wait_seconds_bucket", le="0.5") == 1
    assert value(text, "snapfleet_queue_wait_seconds_bucket", le="60.0") == 2
    assert value(text, "snapfleet_restore_seconds_count", pool="warm") == 2
    assert value(text, "snapfleet_restore_seconds_sum", pool="warm") == pytest.approx(0.29)
    assert value(text, "snapfleet_restore_seconds_bucket", pool="warm", le="0.05") == 0
    assert value(text, "snapfleet_restore_seconds_bucket", pool="warm", le="0.1") == 1
    assert value(text, "snapfleet_restore_seconds_bucket", pool="warm", le="0.3") == 2
    assert value(text, "snapfleet_restore_seconds_count", pool="cold") == 1
    assert value(text, "snapfleet_restore_seconds_bucket", pool="cold", le="1.5") == 0
    assert value(text, "snapfleet_restore_seconds_bucket", pool="cold", le="2.5") == 1
    assert value(text, "snapfleet_restore_seconds_bucket", pool="cold", le="10.0") == 1
    assert value(text, "snapfleet_vms_running") == 2
    expected = {
        ("vcpus", "total"): 8, ("vcpus", "used"): 2,
        ("memory_mib", "total"): 16384, ("memory_mib", "used"): 1024,
        ("gpus", "total"): 1, ("gpus", "used"): 0,
        ("slots", "total"): 8, ("slots", "used"): 2,
    }  # fmt: skip
    for (resource, kind), want in expected.items():
        assert value(text, "snapfleet_capacity", resource=resource, kind=kind) == want
    assert value(text, "snapfleet_recoveries_total", kind="orphan_network") == 2
    assert value(text, "snapfleet_recoveries_total", kind="lost_job") == 1
    assert value(text, "snapfleet_recoveries_total", kind="orphan_dir") == 0
    assert value(text, "snapfleet_recoveries_total", kind="orphan_vm") == 0
    assert value(text, "snapfleet_pool_idle", profile="default") == 4
    assert value(text, "snapfleet_build_info", version=__version__) == 1


async def test_tcp_endpoint_values() -> None:
    m = Metrics()
    async with serve_metrics(m, "127.0.0.1:0") as where:
        assert where is not None
        host, port = where.rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0
        exercise(m)
        content_type, text = await scrape(f"http://{where}/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    check_values(text)
    # Closed on exit.
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port))):
        pass


async def test_ipv6_endpoint() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    async with serve_metrics(Metrics(), "[::1]:0") as where:
        assert where is not None
        assert where.startswith("[::1]:")
        _, text = await scrape(f"http://{where}/metrics")
    assert value(text, "snapfleet_vms_running") == 0


async def test_unix_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "run" / "sub" / "metrics.sock"
    m = Metrics()
    async with serve_metrics(m, f"unix:{path}") as where:
        assert where == f"unix:{path}"
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o755 == 0o755
        exercise(m)
        _, text = await scrape("http://localhost/metrics", aiohttp.UnixConnector(path=str(path)))
    check_values(text)
    assert not path.exists()


async def test_unix_socket_group(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    async with serve_metrics(Metrics(), f"unix:{path}", group="root"):
        assert path.stat().st_gid == 0
    with pytest.raises(ConfigError) as info:
        async with serve_metrics(Metrics(), f"unix:{path}", group="no-such-group-sf"):
            pass
    assert info.value.key == "daemon.api_group"


async def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    async with serve_metrics(Metrics(), f"unix:{path}"):
        _, text = await scrape("http://x/metrics", aiohttp.UnixConnector(path=str(path)))
    assert "snapfleet_build_info" in text


async def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    async with serve_metrics(Metrics(), f"unix:{path}"):
        inode = path.stat().st_ino
        with pytest.raises(HostError, match="in use"):
            async with serve_metrics(Metrics(), f"unix:{path}"):
                pass
        assert path.stat().st_ino == inode


async def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    path.write_text("not a socket")
    with pytest.raises(ConfigError) as info:
        async with serve_metrics(Metrics(), f"unix:{path}"):
            pass
    assert info.value.key == "daemon.metrics_listen"
    assert path.read_text() == "not a socket"


async def test_port_in_use_is_a_host_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(HostError, match=f"127.0.0.1:{port}"):
            async with serve_metrics(Metrics(), f"127.0.0.1:{port}"):
                pass


async def test_disabled() -> None:
    async with serve_metrics(Metrics(), "") as where:
        assert where is None


async def test_other_paths_are_not_found() -> None:
    async with (
        serve_metrics(Metrics(), "127.0.0.1:0") as where,
        aiohttp.ClientSession() as session,
        session.get(f"http://{where}/") as resp,
    ):
        assert resp.status == 404


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.job_finished("failed")
    assert value(b.render().decode(), "snapfleet_jobs_total", outcome="failed") == 0
    assert value(a.render().decode(), "snapfleet_jobs_total", outcome="failed") == 1


def test_unknown_outcome() -> None:
    with pytest.raises(ValueError, match="exploded"):
        Metrics().job_finished("exploded")


@pytest.mark.parametrize(
    ("listen", "parsed"),
    [
        ("127.0.0.1:9464", TCPListen("127.0.0.1", 9464)),
        ("0.0.0.0:9464", TCPListen("0.0.0.0", 9464)),
        ("localhost:1", TCPListen("localhost", 1)),
        ("[::1]:9464", TCPListen("::1", 9464)),
        ("[::]:0", TCPListen("::", 0)),
        ("unix:/run/snapfleet/metrics.sock", UnixListen(Path("/run/snapfleet/metrics.sock"))),
        ("", None),
    ],
)
def test_parse_listen(listen: str, parsed: TCPListen | UnixListen | None) -> None:
    assert parse_listen(listen, KEY) == parsed


@pytest.mark.parametrize(
    "listen",
    [
        "9464",
        ":9464",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "::1:9464",
        "[::1]",
        "[not-v6]:9464",
        "http://127.0.0.1:9464/metrics",
        " 127.0.0.1:9464",
        "host name:9464",
        "unix:",
        "unix:relative.sock",
        "unix:/run/snapfleet/",
        "unix:/" + "x" * 107,
    ],
)
async def test_bad_listen(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(listen, KEY)
    assert info.value.key == "daemon.metrics_listen"
    assert "daemon.metrics_listen" in str(info.value)
    with pytest.raises(ConfigError):
        async with serve_metrics(Metrics(), listen):
            pass


def test_socket_path_limit_is_exact(tmp_path: Path) -> None:
    longest = "/" + "x" * 106
    assert parse_listen(f"unix:{longest}", KEY) == UnixListen(Path(longest))
    assert len(os.fsencode(longest)) == 107
