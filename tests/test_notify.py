"""The systemd notify protocol against a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.service.notify import Notifier, watchdog_loop


class FakeSystemd:
    """A bound AF_UNIX datagram socket that collects what the notifier sends."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = tmp_path / "notify.sock"
    fake = FakeSystemd(str(path))
    yield fake, str(path)
    fake.sock.close()


def test_messages_arrive_exactly(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier.for_socket(path)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.ready("serving; 2 queued")
    assert notifier.status("draining\n3 jobs")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.extend_timeout(1.5)
    assert fake.received() == [
        b"READY=1",
        b"READY=1\nSTATUS=serving; 2 queued",
        b"STATUS=draining 3 jobs",  # a newline would start a new assignment
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"EXTEND_TIMEOUT_USEC=1500000",
    ]
    notifier.close()


def test_abstract_socket() -> None:
    name = f"snapfleet-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        notifier = Notifier.for_socket(f"@{name}")
        assert notifier.ready("up")
        assert fake.received() == [b"READY=1\nSTATUS=up"]
        notifier.close()
    finally:
        fake.sock.close()


def test_reads_and_unsets_the_environment(
    systemd: tuple[FakeSystemd, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, path = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    # Children (QEMU, nft) must not inherit any of it.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert var not in os.environ
    assert notifier.watchdog_interval() == 15.0
    assert notifier.ready()
    assert fake.received() == [b"READY=1"]
    notifier.close()


def test_watchdog_meant_for_another_process_is_ignored(systemd: tuple[FakeSystemd, str]) -> None:
    _fake, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert Notifier(env).watchdog_interval() is None
    assert env == {}


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/path"},
        {"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"},
    ],
)
def test_noop_without_a_usable_socket(env: dict[str, str]) -> None:
    notifier = Notifier(env)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_watchdog_for_bad_usec(systemd: tuple[FakeSystemd, str], usec: str) -> None:
    _fake, path = systemd
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": usec}).watchdog_interval() is None


def test_send_errors_are_ignored(tmp_path: Path) -> None:
    # systemd went away: the socket path no longer exists.
    notifier = Notifier.for_socket(str(tmp_path / "gone.sock"))
    assert notifier.enabled
    assert not notifier.ready()
    notifier.close()


def test_send_never_blocks_when_the_receiver_is_full(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier.for_socket(path)
    # Nobody reads: the receive queue fills and sends fail with EAGAIN
    # instead of waiting.
    results = [notifier.status("x" * 1000) for _ in range(10_000)]
    assert results[0]
    assert not results[-1]
    assert fake.received()
    notifier.close()


async def test_watchdog_loop_pings_at_half_the_interval(
    systemd: tuple[FakeSystemd, str],
) -> None:
    fake, path = systemd
    notifier = Notifier.for_socket(path, watchdog_usec=200_000)
    assert notifier.watchdog_interval() == pytest.approx(0.1)
    healthy = True
    task = asyncio.create_task(watchdog_loop(notifier, lambda: healthy))
    try:
        await asyncio.sleep(0.55)
        pings = fake.received()
        # 0.1 s apart: five in 0.55 s, give or take for scheduling jitter on a busy loop.
        assert 3 <= len(pings) <= 7
        assert set(pings) == {b"WATCHDOG=1"}

        healthy = False
        await asyncio.sleep(0.12)  # a ping may already have been due
        fake.received()
        await asyncio.sleep(0.35)
        assert fake.received() == []

        healthy = True
        for _ in range(40):  # pings resume (allow for a loop busy with other tests' VMs)
            await asyncio.sleep(0.05)
            if fake.received():
                break
        else:
            pytest.fail("watchdog pings did not resume once healthy again")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_returns_without_a_watchdog(systemd: tuple[FakeSystemd, str]) -> None:
    _fake, path = systemd
    await asyncio.wait_for(watchdog_loop(Notifier.for_socket(path), lambda: True), timeout=1)
    await asyncio.wait_for(watchdog_loop(Notifier({}), lambda: True), timeout=1)
