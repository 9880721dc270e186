"""The console watch (pure) and the capped console file, without a VM."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runner.vm.console import (
    ConsoleLog,
    ConsoleWatch,
    console_pipe,
    describe,
    end_from_shutdown,
)

PANIC = b"[   12.1] Kernel panic - not syncing: sysrq triggered crash\r\n"


@pytest.mark.parametrize(
    ("chunks", "end"),
    [
        ([b"booting\r\n", b"login ok\r\n"], None),
        ([PANIC], "panicked"),
        ([PANIC[:20], PANIC[20:]], "panicked"),  # split across reads
        ([b"x" * 100 + PANIC[:-30], PANIC[-30:]], "panicked"),
        ([b"[ 3.0] reboot: Restarting system\r\n"], "rebooted"),
        ([b"[ 3.0] reboot: Power down\r\n"], "powered off"),
        ([b"reboot: System halted\r\n"], "halted"),
        # The first sign counts: a panic that then restarts is a panic.
        ([PANIC + b"reboot: Restarting system\r\n"], "panicked"),
        ([PANIC, b"reboot: Restarting system\r\n"], "panicked"),
    ],
)
def test_watch_finds_how_the_guest_ended(chunks: list[bytes], end: str | None) -> None:
    watch = ConsoleWatch(keep=4096)
    said = [watch.feed(chunk) for chunk in chunks]
    assert watch.end == end
    assert [s for s in said if s is not None] == ([end] if end else [])


def test_watch_keeps_a_bounded_tail_of_whole_lines() -> None:
    watch = ConsoleWatch(keep=100)
    for i in range(1000):
        watch.feed(f"line {i}\r\n".encode())
    assert len(watch.data) == 100
    assert watch.tail(2) == "line 998\nline 999"


def test_tail_starts_just_before_the_panic_message() -> None:
    watch = ConsoleWatch(keep=65536)
    watch.feed(b"".join(f"job line {i}\r\n".encode() for i in range(100)))
    watch.feed(PANIC + b"".join(f" trace {i}\r\n".encode() for i in range(100)))
    tail = watch.tail(10).split("\n")
    assert tail[:4] == ["job line 97", "job line 98", "job line 99", PANIC.decode().strip()]
    assert len(tail) == 10


@pytest.mark.parametrize(
    ("reason", "end"),
    [("guest-reset", "rebooted"), ("guest-shutdown", "powered off"),
     ("guest-panic", "panicked"), ("host-signal", None), ("host-qmp-quit", None), (None, None)],
)
def test_shutdown_reasons(reason: str | None, end: str | None) -> None:
    assert end_from_shutdown(reason) == end


def test_reasons_read_as_the_job_sees_them() -> None:
    assert describe("panicked") == "guest kernel panicked"
    assert describe("rebooted") == "guest rebooted"
    assert describe("powered off") == "guest powered off"


async def test_console_file_never_passes_its_cap(tmp_path: Path) -> None:
    ours, theirs = console_pipe()
    path = tmp_path / "console.log"
    console = ConsoleLog(ours, path, max_bytes=65536)
    console.start("console-test")
    sizes = []
    for i in range(2000):
        await asyncio.to_thread(os.write, theirs, f"spew {i:06d} ".encode() * 20 + b"\n")
        if i % 50 == 0:
            sizes.append(path.stat().st_size)
    await asyncio.to_thread(os.write, theirs, PANIC)
    os.close(theirs)
    await asyncio.wait_for(console.ended.wait(), 5)
    await console.stop()
    await console.stop()  # twice is harmless
    sizes.append(path.stat().st_size)
    assert max(sizes) <= 65536
    assert console.watch.end == "panicked"
    assert console.ended.is_set()
    data = path.read_bytes()
    assert data.endswith(PANIC)  # the newest output is kept
    assert b"spew 001999" in data
    assert console.error is None
