"""What an idle clone costs the host: checks behind bench/density.py's figures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runner.agent.messages import Command
from runner.engine import Engine
from runner.snapshots import Snapshot
from runner.vm.backend import Machine
from runner.vm.qemu_machine import thp_for_children

pytestmark = pytest.mark.vm


def rollup_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in smaps_rollup of {pid}")


async def output(machine: Machine, script: str) -> str:
    session = await machine.exec(Command(script=script))
    data = b""
    async for chunk in session:
        data += chunk.data
    result = await session.wait()
    assert result.exit_code == 0, data
    return data.decode()


async def test_an_idle_tcg_clone_holds_no_huge_pages(engine: Engine, snapshot: Snapshot) -> None:
    if snapshot.spec.accel != "tcg":
        pytest.skip("the setting is for TCG; under KVM the host's policy applies")
    machine = await engine.restore(snapshot, use_pool=False)
    try:
        assert machine.pid is not None
        await output(machine, "echo warm")  # the translation cache has grown by now
        # With huge pages, the translation cache alone holds 12-16 MiB of 2 MiB pages.
        assert rollup_kb(machine.pid, "AnonHugePages") == 0
    finally:
        await machine.destroy()


def test_the_huge_page_flag_reaches_children_and_can_be_lifted() -> None:
    status = Path("/proc/self/status")
    try:
        thp_for_children(False)
        assert "THP_enabled:\t0" in status.read_text()
        thp_for_children(True)
        assert "THP_enabled:\t1" in status.read_text()
    finally:
        thp_for_children(True)


async def test_a_clone_starts_with_nothing_to_write_back(
    engine: Engine, snapshot: Snapshot
) -> None:
    machine = await engine.restore(snapshot, use_pool=False)
    try:
        # The template synced before its save: no clone writes its pages back.
        # /proc/meminfo folds in per-CPU counters once a second (vm.stat_interval):
        # refresh them first, or a count from before the template's sync shows.
        meminfo = await output(
            machine,
            "echo 1 > /proc/sys/vm/stat_refresh; grep -E '^(Dirty|Writeback):' /proc/meminfo",
        )
        dirty = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.splitlines()}
        assert dirty == {"Dirty": 0, "Writeback": 0}, meminfo
        before = await output(machine, "cat /sys/block/vda/stat")
        await asyncio.sleep(6)  # past the kernel's 5 s writeback interval
        after = await output(machine, "cat /sys/block/vda/stat")
        assert before.split()[4:8] == after.split()[4:8], "the idle clone wrote to its disk"
    finally:
        await machine.destroy()


async def test_an_idle_tcg_clone_keeps_the_tsc_and_does_not_tick(
    engine: Engine, snapshot: Snapshot
) -> None:
    if snapshot.spec.accel != "tcg":
        pytest.skip("the TSC watchdog misjudges TCG's TSC only")
    machine = await engine.restore(snapshot, use_pool=False)
    try:
        # A TSC judged unstable (as under host load, without tsc=reliable) leaves the
        # guest on jiffies: a 250 Hz tick in every idle clone.
        assert "tsc=reliable" in (await output(machine, "cat /proc/cmdline")).split()
        source = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
        assert (await output(machine, f"cat {source}")).strip() == "tsc"
        count = "grep LOC: /proc/interrupts | tr -s ' ' | cut -d' ' -f2"
        ticks = await output(machine, f"{count}; sleep 2; {count}")
        first, last = (int(n) for n in ticks.split())
        assert last - first < 100, f"{last - first} timer interrupts in 2 s of idle"
    finally:
        await machine.destroy()
