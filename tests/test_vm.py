"""Real microVMs restored from a real snapshot (TCG on this host, KVM elsewhere)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiohttp import web

from runner.engine import Engine
from runner.execution import Command, Outcome, OutputSink, Report, command_work
from runner.execution import run as run_job
from runner.service.jobs import JobState
from runner.snapshots import Snapshot
from runner.vm.backend import VMState
from runner.vm.qemu import QemuMachine
from tests.conftest import leftovers

pytestmark = pytest.mark.vm


class Collector:
    """An output sink that remembers (stream, data, arrival time)."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes, float]] = []
        self.wall: list[float] = []

    def __call__(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data, time.monotonic()))
        self.wall.append(time.time())

    def text(self, stream: str | None = None) -> str:
        return b"".join(d for s, d, _ in self.chunks if stream in (None, s)).decode()


async def job(
    engine: Engine, script: str, out: OutputSink, *, timeout_s: float = 120,
    env: dict[str, str] | None = None, cwd: str | None = None,
) -> tuple[Report, list[str]]:
    """One job through the run path every caller uses; returns its report and notes."""
    notes: list[str] = []
    work = command_work(Command(script=script, env=env or {}, cwd=cwd), out, timeout_s)
    report = await run_job(engine, engine.settings.profile(), work, timeout_s=timeout_s,
                           note=notes.append)
    return report, notes


async def run(
    engine: Engine,
    snapshot: Snapshot,
    script: str,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float = 120,
) -> tuple[Collector, Outcome]:
    out = Collector()
    report, _notes = await job(engine, script, out, timeout_s=timeout_s, env=env, cwd=cwd)
    assert report.restored is not None
    assert report.restored.snapshot == snapshot.key
    return out, report.outcome


async def test_output_streams_live_in_order_with_exit_code(
    engine: Engine, snapshot: Snapshot
) -> None:
    out, result = await run(
        engine,
        snapshot,
        "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; sleep 2; echo done; exit 3",
    )
    assert result.exit_code == 3
    lines = [(s, d.decode()) for s, d, _ in out.chunks]
    assert [text for _, text in lines] == ["one\n", "two\n", "three\n", "done\n"]
    assert [s for s, _ in lines] == ["stdout", "stderr", "stdout", "stdout"]
    # Live: "three" arrived while the guest was still sleeping, not at the end.
    arrival = {d.decode(): t for _, d, t in out.chunks}
    assert arrival["done\n"] - arrival["three\n"] > 1.5


async def test_timeout_kills_the_job(engine: Engine, snapshot: Snapshot) -> None:
    started = time.monotonic()
    # The timeout covers restore and work: leave the restore room on a loaded host.
    out, result = await run(engine, snapshot, "echo before; sleep 60; echo after", timeout_s=6)
    assert result.state is JobState.TIMED_OUT
    assert out.text() == "before\n"
    assert time.monotonic() - started < 30


async def test_env_and_workdir_reach_the_job(engine: Engine, snapshot: Snapshot) -> None:
    out, result = await run(
        engine, snapshot, 'echo "$GREETING"; pwd', env={"GREETING": "hi there"}, cwd="/tmp"
    )
    assert result.exit_code == 0
    assert out.text() == "hi there\n/tmp\n"


async def test_clones_do_not_share_disk_writes_and_template_is_untouched(
    engine: Engine, snapshot: Snapshot
) -> None:
    a = await engine.restore(snapshot)
    b = await engine.restore(snapshot)
    try:
        write = await a.exec(
            Command(script="echo secret-a > /root/marker && sync && cat /root/marker")
        )
        assert b"".join([c.data async for c in write]) == b"secret-a\n"
        look = await b.exec(Command(script="cat /root/marker 2>&1; echo status=$?"))
        assert b"".join([c.data async for c in look]).endswith(b"status=1\n")
    finally:
        await a.destroy()
        await b.destroy()
    await snapshot.verify()  # memory, device state and disk byte-identical to creation


async def test_clones_get_fresh_entropy_and_the_host_clock(
    engine: Engine, snapshot: Snapshot
) -> None:
    script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s.%N"
    results = []
    for _ in range(2):
        out, result = await run(engine, snapshot, script)
        assert result.exit_code == 0
        random_hex, guest_time = out.text().split()
        results.append(random_hex)
        # Compare with the host clock when the date arrived: the guest must run on the
        # host's time, not on the template's (frozen when the snapshot was taken).
        assert abs(float(guest_time) - out.wall[-1]) < 1.0
    assert results[0] != results[1]


async def test_clone_cannot_reach_a_host_service(engine: Engine, snapshot: Snapshot) -> None:
    # A listener on the host end of the clone's own veth, the address a guest
    # would most easily find: refused unless the operator offers its port.
    peers: list[str] = []

    async def hello(request: web.Request) -> web.Response:
        peers.append(request.remote or "")
        return web.Response(text="hello from the host")

    machine = await engine.restore(snapshot)
    assert machine.network is not None
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, machine.network.host_address, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"http://{machine.network.host_address}:{port}/"
        session = await machine.exec(Command(argv=[
            "python3",
            "-c",
            "import sys, urllib.request;"
            "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())",
            url,
        ]))
        output = b"".join([c.data async for c in session])
        status = await session.wait()
    finally:
        await machine.destroy()
        await runner.cleanup()
    assert status.exit_code == 1, output
    assert b"timed out" in output, output
    assert peers == []


async def test_killing_qemu_mid_job_is_a_clear_system_error_and_leaves_nothing(
    engine: Engine, snapshot: Snapshot, state_dir: Path
) -> None:
    killed: list[int] = []

    def kill_on_first_output(stream: str, data: bytes) -> None:
        if not killed:
            running = [m.pid for m in engine.hypervisor.live.values()
                       if m.state is VMState.READY and m.pid is not None]
            assert len(running) == 1
            os.kill(running[0], signal.SIGKILL)
            killed.append(running[0])

    report, _ = await job(engine, "echo started; sleep 60", kill_on_first_output)
    assert report.outcome.state is JobState.SYSTEM_FAILURE
    assert "VMM exited with status -9" in str(report.outcome.reason)
    assert killed
    assert not any(leftovers(state_dir, engine.hypervisor.live).values())


async def test_destroyed_vm_refuses_exec(engine: Engine, snapshot: Snapshot) -> None:
    machine = await engine.restore(snapshot)
    report = await machine.destroy()
    assert report.escalation == "quit"
    assert machine.state is VMState.DESTROYED
    from runner.errors import InvalidStateError

    with pytest.raises(InvalidStateError):
        await machine.exec(Command(argv=["true"]))
    assert (await machine.destroy()).escalation == "quit"  # twice is harmless


async def test_eight_clones_at_once(engine: Engine, snapshot: Snapshot, state_dir: Path) -> None:
    script = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    runs = await asyncio.gather(*(run(engine, snapshot, script) for _ in range(8)))
    outputs = [out.text() for out, _ in runs]
    assert all(result.exit_code == 0 for _, result in runs), outputs
    assert len({o.split()[0] for o in outputs}) == 8  # eight different VMs
    assert len({o.split()[1] for o in outputs}) == 8  # eight different entropy pools
    assert not any(leftovers(state_dir, engine.hypervisor.live).values())


async def test_qemu_runs_unprivileged_in_its_own_cgroup(
    engine: Engine, snapshot: Snapshot, settings: object
) -> None:
    machine = await engine.restore(snapshot)
    try:
        pid = machine.pid
        assert pid is not None
        status = Path(f"/proc/{pid}/status").read_text()
        uid = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:"))
        assert set(uid) != {"0"}, "QEMU still runs as root"
        assert "CapEff:\t0000000000000000" in status
        groups = Path(f"/proc/{pid}/cgroup").read_text()
        tail = f"/snapfleet/{engine.instance}/{machine.vm_id}"
        limited = [ln for ln in groups.splitlines() if ln.endswith(tail)]
        assert limited, groups
        session = await machine.exec(Command(argv=["echo", "works"]))
        assert b"".join([c.data async for c in session]) == b"works\n"
    finally:
        await machine.destroy()
    left = [p for p in Path("/sys/fs/cgroup").rglob(machine.vm_id)]
    assert not left, f"cgroups left behind: {left}"


def _reboot_call(how: int) -> str:
    # The image has no reboot(8); a job calling reboot(2) is what `reboot -f` does.
    return (
        "python3 -c 'import ctypes, os; os.sync(); print(\"ending\", flush=True); "
        f"ctypes.CDLL(None).reboot({how:#x})'; sleep 600"
    )


@pytest.mark.parametrize(
    ("script", "how", "reason", "console"),
    [
        ("echo ending; echo c > /proc/sysrq-trigger; sleep 600",
         "panicked", "guest kernel panicked", "Kernel panic"),
        (_reboot_call(0x01234567), "rebooted", "guest rebooted", "reboot: Restarting system"),
        (_reboot_call(0x4321FEDC), "powered off", "guest powered off", "reboot: Power down"),
        # No word on the console: QEMU's own SHUTDOWN reason says what happened.
        ("echo ending; echo b > /proc/sysrq-trigger; sleep 600",
         "rebooted", "guest rebooted", "sysrq: Resetting"),
    ],
    ids=["panic", "reboot", "poweroff", "sysrq-reset"],
)
async def test_guest_ending_itself_ends_the_job_at_once(
    engine: Engine, snapshot: Snapshot, state_dir: Path,
    script: str, how: str, reason: str, console: str,
) -> None:
    out = Collector()
    report, notes = await job(engine, script, out, timeout_s=3600)
    ended = time.monotonic()
    assert out.text() == "ending\n"
    took = ended - out.chunks[0][2]
    print(f"{how}: job ended {took:.2f}s after the guest began to end")
    assert took < 10, took  # not the 3600 s timeout; ~1 s measured under TCG
    assert report.outcome.state is JobState.SYSTEM_FAILURE
    assert str(report.outcome.reason).endswith(reason), report.outcome.reason
    assert how in str(report.outcome.reason)
    # The guest's last console lines are in the job's log.
    assert any(console in note for note in notes if note.startswith("console: ")), notes
    assert not any(leftovers(state_dir, engine.hypervisor.live).values())


async def test_console_spew_leaves_a_bounded_file(engine: Engine, snapshot: Snapshot) -> None:
    cap = engine.hypervisor.settings.console_max_bytes
    machine = await engine.restore(snapshot)
    assert isinstance(machine, QemuMachine)
    try:
        started, cpu = time.monotonic(), time.process_time()
        spew = await machine.exec(
            Command(script=f"yes | head -c {3 * cap} > /dev/ttyS0; echo done")
        )
        assert b"".join([c.data async for c in spew]) == b"done\n"
        took, cpu = time.monotonic() - started, time.process_time() - cpu
        size = machine.console_log.stat().st_size
        print(f"{3 * cap} console bytes in {took:.1f}s, {cpu:.1f}s CPU here; file {size}")
        assert 0 < size <= cap
        assert machine.console_log.read_bytes().endswith(b"y\r\n")
        # The guest still answers: a busy console does not wedge it.
        still = await machine.exec(Command(argv=["echo", "alive"]))
        assert b"".join([c.data async for c in still]) == b"alive\n"
    finally:
        await machine.destroy()
    assert not machine.console_log.exists()


async def test_a_job_sees_roots_home_and_not_the_agents_pythonpath(
    engine: Engine, snapshot: Snapshot
) -> None:
    out, result = await run(engine, snapshot, 'echo "$HOME|${PYTHONPATH-unset}"; cd && pwd')
    assert result.exit_code == 0
    assert out.text() == "/root|unset\n/root\n"
