"""GPU jobs in real VMs, with QEMU's emulated ``edu`` device (1234:11e8) standing in
for the GPU: the same allocator, seam, hot-plug and guest check a VFIO GPU takes."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import compose
from runner.config import Settings, load_settings
from runner.engine import Engine
from runner.errors import ConfigError, VMError
from runner.execution import Command, Report, command_work
from runner.execution import run as run_job
from runner.gpu import EduSource
from runner.service.jobs import Job, JobSpec, JobState
from runner.vm.backend import Devices
from tests.backends.toy import ReadyNotifier
from tests.conftest import CACHE_DIR, leftovers, qemu_processes
from tests.test_vm import Collector

pytestmark = pytest.mark.vm

LIST_PCI = "for d in /sys/bus/pci/devices/*; do echo $(cat $d/vendor):$(cat $d/device); done"
EDU = "0x1234:0x11e8"


def gpu_settings(state_dir: Path, *, extra: dict[str, Any] | None = None,
                 **gpu: object) -> Settings:
    return load_settings(
        None,
        paths={"cache_dir": CACHE_DIR, "state_dir": state_dir},
        net={"egress": "none", "dns": []},
        gpu={"source": "edu", "edu_devices": 2, "hotplug_timeout_s": 10, **gpu},
        profiles={
            "default": {},
            "gpu": {"gpus": 1},
            "gpucold": {"gpus": 1, "gpu_mode": "coldboot"},
            "h100": {"gpu": "10de:2330"},
            "gpuimage": {"gpus": 1, "image": "gpu"},
        },
        **(extra or {}),
    )


@pytest.fixture(scope="module")
def gpu_state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sfg-", dir="/tmp"))
    yield path
    left = leftovers(path)
    shutil.rmtree(path, ignore_errors=True)
    assert not any(left.values()), f"GPU tests leaked: {left}"


@pytest.fixture(scope="module")
async def gpu_engine(gpu_state: Path) -> AsyncIterator[Engine]:
    async with compose.engine(gpu_settings(gpu_state)) as eng:
        yield eng


async def job(engine: Engine, profile: str, script: str, *, timeout_s: float = 120
              ) -> tuple[Report, Collector, list[str]]:
    out = Collector()
    notes: list[str] = []
    work = command_work(Command(script=script), out, timeout_s)
    report = await run_job(engine, engine.settings.profile(profile), work, timeout_s=timeout_s,
                           note=notes.append)
    return report, out, notes


def assert_free(engine: Engine) -> None:
    assert engine.gpus is not None
    stats = engine.gpus.stats()
    assert (stats["leased"], stats["free"], stats["quarantined"]) == (0, 2, 0), stats


async def test_a_restored_clone_gets_the_device_hot_plugged(gpu_engine: Engine) -> None:
    report, out, notes = await job(gpu_engine, "gpu", LIST_PCI)
    assert report.outcome.state is JobState.SUCCEEDED, (report.outcome, notes)
    assert EDU in out.text().split()
    assert report.restored is not None
    assert report.restored.snapshot
    assert len(report.restored.gpus) == 1
    assert any(n.startswith("GPU ready in the guest") and "1234:11e8 at 0000:01:00.0" in n
               for n in notes), notes
    # Gone with the VM: its QEMU exited and the device is back in the pool.
    assert qemu_processes(report.restored.vm_id) == []
    assert_free(gpu_engine)


async def test_the_gpu_image_boots_and_its_tools_see_the_plugged_device(
    gpu_engine: Engine,
) -> None:
    report, out, notes = await job(gpu_engine, "gpuimage", "lspci -n -d 1234:11e8; lsmod | head -1")
    assert report.outcome.state is JobState.SUCCEEDED, (report.outcome, notes)
    assert out.text().splitlines()[0].split()[:3] == ["01:00.0", "00ff:", "1234:11e8"]
    assert out.text().splitlines()[1].startswith("Module")  # kmod is there for drivers
    assert_free(gpu_engine)


async def test_the_gpu_snapshot_itself_holds_no_device(gpu_engine: Engine) -> None:
    """The template was saved with empty root ports: the device a job sees is the plug."""
    profile = gpu_engine.settings.profile("gpu")
    snapshot = await gpu_engine.snapshot(profile, print)
    assert snapshot.spec.pcie_root_ports == 1
    plain = await gpu_engine.snapshot(gpu_engine.settings.profile("default"), print)
    assert plain.key != snapshot.key
    machine = await gpu_engine.restore(snapshot)
    try:
        session = await machine.exec(Command(script=LIST_PCI))
        seen = b"".join([c.data async for c in session]).decode()
        assert EDU not in seen.split()
        assert "0x1b36:0x000c" in seen.split()  # the empty pcie-root-port is there
    finally:
        await machine.destroy()


async def test_two_concurrent_jobs_never_get_the_same_device(gpu_engine: Engine) -> None:
    results = await asyncio.gather(
        *(job(gpu_engine, "gpu", LIST_PCI + "; sleep 2") for _ in range(3)))
    done = [r for r, _, _ in results if r.outcome.state is JobState.SUCCEEDED]
    refused = [r for r, _, _ in results if r.outcome.state is not JobState.SUCCEEDED]
    assert len(done) == 2, [r.outcome for r, _, _ in results]
    units = [u for r in done for u in (r.restored.gpus if r.restored else ())]
    assert sorted(units) == ["edu0", "edu1"]
    # Two devices, three jobs: the third is told why (a daemon would have queued it).
    assert len(refused) == 1
    assert refused[0].outcome.state is JobState.SYSTEM_FAILURE
    assert "needs 1 GPU, 0 free" in (refused[0].outcome.reason or "")
    assert_free(gpu_engine)


async def test_coldboot_mode_boots_with_the_device(gpu_engine: Engine) -> None:
    report, out, notes = await job(gpu_engine, "gpucold", LIST_PCI)
    assert report.outcome.state is JobState.SUCCEEDED, (report.outcome, notes)
    assert EDU in out.text().split()
    assert report.restored is not None
    assert report.restored.snapshot == ""
    assert any(n.startswith("booted default cold") for n in notes), notes
    assert_free(gpu_engine)


async def test_a_plain_vm_cannot_take_a_device(gpu_engine: Engine) -> None:
    snapshot = await gpu_engine.snapshot(gpu_engine.settings.profile("default"), print)
    machine = await gpu_engine.restore(snapshot)
    source = EduSource(1)
    try:
        with pytest.raises(VMError, match="free root port"):
            await machine.attach(Devices(source, tuple(source.units())))
    finally:
        await machine.destroy()


async def test_a_hot_plug_the_guest_never_takes_fails_the_job_and_frees_the_device(
    gpu_state: Path,
) -> None:
    # pcie_ports=compat leaves the guest without pciehp: it never notices the plug.
    settings = gpu_settings(gpu_state, guest_cmdline="pcie_ports=compat", hotplug_timeout_s=2)
    async with compose.engine(settings) as engine:
        report, out, _notes = await job(engine, "gpu", "echo the job ran")
        assert report.outcome.state is JobState.SYSTEM_FAILURE
        reason = report.outcome.reason or ""
        assert "did not take the hot-plugged device(s) within 2s" in reason, reason
        assert "1234:11e8: 0 of 1 present" in reason
        assert "\n" not in reason
        assert out.text() == ""  # the job never started
        assert report.teardown is not None
        assert_free(engine)
    assert leftovers(gpu_state) == {k: [] for k in leftovers(gpu_state)}


async def test_the_daemon_queues_gpu_jobs_for_free_devices_and_recovers_stale_leases(
    gpu_state: Path,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="sfgd-", dir="/tmp"))
    # A daemon that died mid-job left edu1 leased to a VM that no longer exists.
    (root / "gpu-leases.json").write_text(json.dumps({
        "version": 1, "quarantined": {},
        "leases": [{"owner": "run-dead", "unit": "edu1", "plan": []}]}))
    settings = gpu_settings(root, extra={
        "daemon": {"api_socket": root / "api.sock", "metrics_listen": ""},
        "capacity": {"vcpus": 4, "max_concurrency": 4}})
    notifier = ReadyNotifier()
    daemon = compose.daemon(settings, notifier=notifier)
    serve = asyncio.create_task(daemon.serve())
    try:
        await asyncio.wait_for(notifier.is_ready.wait(), 60)
        gpus = daemon.engine.gpus
        assert gpus is not None
        assert gpus.stats()["leased"] == 0  # recovered at start
        assert daemon.total.gpus == 2
        with pytest.raises(ConfigError, match="hands out 0 of that model"):
            await daemon.submit(JobSpec(script="true", profile="h100"), source="local")
        finished: dict[str, JobState] = {}
        all_done = asyncio.Event()

        def heard(job: Job) -> None:
            finished[job.id] = job.state
            if len(finished) == 3:
                all_done.set()

        daemon.subscribe(heard)
        jobs = [await daemon.submit(JobSpec(script=LIST_PCI + "; sleep 3", profile="gpu"),
                                    source="local") for _ in range(3)]
        most = 0
        while not all_done.is_set():
            # Never more jobs started than devices: the third waits in the queue.
            assert len(daemon.tasks) <= 2
            most = max(most, gpus.stats()["leased"])
            await asyncio.sleep(0.05)
        assert set(finished.values()) == {JobState.SUCCEEDED}, finished
        assert most == 2  # both devices were in use at once
        for job in jobs:
            log = (root / "logs" / f"{job.id}.log").read_bytes().decode()
            assert EDU in log.split(), log
        assert gpus.stats()["leased"] == 0
        samples = daemon.metrics.registry.get_sample_value
        assert samples("snapfleet_gpus", {"state": "free"}) == 2
        assert samples("snapfleet_capacity", {"resource": "gpus", "kind": "total"}) == 2
    finally:
        daemon.stop()
        await asyncio.wait_for(serve, 60)
        left = leftovers(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not any(left.values()), left
