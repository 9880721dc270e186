"""GPU host side against sysfs trees: discovery, binding, quarantine, leases, recovery.

The trees (tests/fake_sysfs.py) follow real hosts' layouts; a thread plays the
kernel, answering writes to drivers_probe/unbind/reset. Everything else is the
real code.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from runner.config import load_settings
from runner.errors import ConfigError, GpuBindError, GpuUnavailable
from runner.gpu import (
    EduSource,
    GpuAllocator,
    GpuRequest,
    GpuSettings,
    Sysfs,
    VfioBinder,
    VfioSource,
    assess,
    device_option,
    scan,
)
from runner.gpu.allocator import vfio_holders
from runner.gpu.doctor import gpu_checks
from tests.fake_sysfs import SHARED_GROUP, WORKSTATION, FakeHost

RTX, RTX_AUDIO, H100 = "0000:01:00.0", "0000:01:00.1", "0000:02:00.0"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[FakeHost]:
    with FakeHost(tmp_path / "sys", WORKSTATION + SHARED_GROUP) as fake:
        yield fake


BIND_TIMEOUT_S = 3.0
"""The fake kernel answers from a thread: a loaded host (the whole suite on two cores)
has made it miss 0.5 s. Only the tests of a driver that never answers wait this long."""


def settings(**kw: object) -> GpuSettings:
    return GpuSettings.model_validate({"bind_timeout_s": BIND_TIMEOUT_S, **kw})


def source(host: FakeHost, **kw: object) -> VfioSource:
    sysfs = Sysfs(host.root)
    return VfioSource(settings(**kw), sysfs, VfioBinder(sysfs, timeout_s=BIND_TIMEOUT_S))


# -- discovery


def verdicts(host: FakeHost, **kw: object) -> dict[str, str]:
    return {a.address: a.reason for a in assess(scan(Sysfs(host.root)), settings(**kw))}


def test_gpu_goes_with_its_audio_function_and_leaves_the_bridge(host: FakeHost) -> None:
    found = assess(scan(Sysfs(host.root)), settings(devices=[RTX, H100]))
    rtx = next(a for a in found if a.address == RTX)
    assert rtx.unit is not None
    assert rtx.model == "10de:2684"
    # Function 0 last: QEMU announces a multifunction card when function 0 arrives.
    assert [f.address for f in rtx.unit.functions] == [RTX_AUDIO, RTX]
    assert rtx.reason == "usable with 0000:01:00.1 (IOMMU group 2)"
    h100 = next(a for a in found if a.address == H100)
    assert h100.unit is not None
    assert [f.address for f in h100.unit.functions] == [H100]


def test_group_shared_with_host_devices_is_not_viable(host: FakeHost) -> None:
    reason = verdicts(host, devices="auto")["0000:0b:00.0"]
    assert "IOMMU group 20 also holds 0000:09:00.0 (Ethernet controller 8086:1539, driver igb)" \
        in reason
    assert "must stay with the host" in reason


def test_auto_never_takes_a_device_the_host_uses(host: FakeHost) -> None:
    auto = verdicts(host, devices="auto")
    assert "bound to host driver nvidia" in auto[RTX]
    assert auto[H100].startswith("usable")
    assert verdicts(host, devices="auto", vendors=["1002"]) == {
        "0000:0b:00.0": verdicts(host, devices="auto")["0000:0b:00.0"]}
    # Listed explicitly, the operator gives it up.
    assert verdicts(host, devices=[RTX])[RTX].startswith("usable")


def test_missing_listed_device_and_no_reset_method(tmp_path: Path) -> None:
    devs = [replace(d, reset=d.address != RTX) for d in WORKSTATION if d.address != H100]
    with FakeHost(tmp_path / "sys", devs) as fake:
        found = verdicts(fake, devices=[RTX, H100])
    assert found[H100] == "not present on this host"
    assert "no reset method" in found[RTX]


def test_host_without_iommu(tmp_path: Path) -> None:
    with FakeHost(tmp_path / "sys", WORKSTATION, iommu=False) as fake:
        found = verdicts(fake, devices="auto")
        checks = {c.name: c for c in gpu_checks(settings(devices="auto"), largest_gpu_vm_mib=0,
                                                 sysfs=Sysfs(fake.root),
                                                 cmdline=tmp_path / "missing",
                                                 modules_dir=tmp_path, memlock_bytes=2**23)}
    assert "the IOMMU is off" in found[H100]
    assert not checks["iommu"].ok
    assert checks["iommu"].detail.startswith("IOMMU off")
    assert "intel_iommu=on" in checks["iommu"].detail
    assert not checks[f"gpu {H100}"].ok


def test_doctor_on_a_prepared_host(host: FakeHost, tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on iommu=pt quiet\n")
    checks = {c.name: c for c in gpu_checks(
        settings(devices=[RTX, "0000:0b:00.0"]), largest_gpu_vm_mib=16384,
        sysfs=Sysfs(host.root), cmdline=cmdline, modules_dir=tmp_path,
        memlock_bytes=64 * 2**20)}
    assert checks["iommu"].ok
    assert "intel_iommu=on iommu=pt" in checks["iommu"].detail
    assert checks["vfio"].ok
    assert checks["vfio"].detail == "vfio-pci is loaded"
    assert not checks["memlock"].ok
    assert "LimitMEMLOCK=infinity" in checks["memlock"].detail
    assert checks[f"gpu {RTX}"].ok
    assert not checks["gpu 0000:0b:00.0"].ok


def test_doctor_finds_vfio_module_to_load(tmp_path: Path) -> None:
    with FakeHost(tmp_path / "sys", WORKSTATION, vfio_loaded=False) as fake:
        modules = tmp_path / "modules"
        modules.mkdir()
        (modules / "modules.dep").write_text(
            "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko\n")
        checks = {c.name: c for c in gpu_checks(settings(), largest_gpu_vm_mib=0,
                                                 sysfs=Sysfs(fake.root), modules_dir=modules,
                                                 memlock_bytes=2**23)}
    assert checks["vfio"].ok
    assert "installed, not loaded" in checks["vfio"].detail


# -- binding


async def test_bind_whole_group_then_give_it_back(host: FakeHost) -> None:
    src = source(host, devices=[RTX])
    unit = src.units()[0]
    plan = src.plan(unit)
    await src.claim(plan)
    assert host.driver(RTX) == host.driver(RTX_AUDIO) == "vfio-pci"
    assert host.override(RTX) == "vfio-pci"
    assert host.driver("0000:00:01.0") == "pcieport"  # the bridge stays with the host
    await src.give_back(plan)
    assert (host.driver(RTX), host.driver(RTX_AUDIO)) == ("nvidia", "snd_hda_intel")
    assert host.override(RTX) == ""
    assert host.override(RTX_AUDIO) == ""
    assert host.resets == {RTX: 1, RTX_AUDIO: 1}  # reset before the host gets it back


async def test_vfio_not_loaded_changes_nothing(tmp_path: Path) -> None:
    with FakeHost(tmp_path / "sys", WORKSTATION, vfio_loaded=False) as fake:
        src = source(fake, devices=[RTX])
        with pytest.raises(GpuBindError, match="modprobe vfio-pci"):
            await src.claim(src.plan(src.units()[0]))
        assert fake.driver(RTX) == "nvidia"
        assert fake.override(RTX) == "(null)"


async def test_host_driver_that_will_not_let_go_is_rolled_back(host: FakeHost) -> None:
    host.stuck.add(RTX)
    src = source(host, devices=[RTX])
    with pytest.raises(GpuBindError, match="host driver nvidia did not let go"):
        await src.claim(src.plan(src.units()[0]))
    # The audio function (moved first) is back with its driver; overrides are cleared.
    assert host.driver(RTX_AUDIO) == "snd_hda_intel"
    assert host.driver(RTX) == "nvidia"
    assert host.override(RTX) == ""
    assert host.override(RTX_AUDIO) == ""


# -- allocator: quarantine, concurrency, recovery


async def test_rebind_failure_quarantines(host: FakeHost, tmp_path: Path) -> None:
    state = tmp_path / "state/gpu.json"
    alloc = GpuAllocator(source(host, devices=[RTX]), state)
    lease = await alloc.acquire("vm-1", GpuRequest(1))
    host.refuse.add(RTX)  # nvidia fails to take the board back
    with capture_logs() as logs:
        sick = await alloc.release(lease)
    assert sick == [RTX]
    assert alloc.stats() == {"total": 1, "leased": 0, "quarantined": 1, "free": 0,
                             "quarantine_events": 1}
    assert any(e["event"] == "gpu_quarantined" and e["device"] == RTX
               and "nvidia did not take it back" in e["reason"] for e in logs)
    with pytest.raises(GpuUnavailable, match=r"0 free .*1 quarantined"):
        await alloc.acquire("vm-2", GpuRequest(1))
    # Quarantine survives a restart; the operator lifts it.
    again = GpuAllocator(source(host, devices=[RTX]), state)
    assert RTX in again.quarantined
    await again.unquarantine(RTX)
    assert GpuAllocator(source(host, devices=[RTX]), state).quarantined == {}


async def test_reset_failure_quarantines(host: FakeHost, tmp_path: Path) -> None:
    alloc = GpuAllocator(source(host, devices=[RTX]), tmp_path / "gpu.json")
    lease = await alloc.acquire("vm-1", GpuRequest(1))
    host.break_reset(RTX)
    assert await alloc.release(lease) == [RTX]
    assert "function reset failed: No space left on device" in alloc.quarantined[RTX]


async def test_concurrent_jobs_never_share_a_device(host: FakeHost, tmp_path: Path) -> None:
    alloc = GpuAllocator(source(host, devices=[RTX, H100]), tmp_path / "gpu.json")
    holding: dict[str, str] = {}
    clashes: list[str] = []
    done: list[str] = []
    most = 0

    async def job(n: int) -> None:
        nonlocal most
        while True:  # as the scheduler would: wait until a device is free
            try:
                lease = await alloc.acquire(f"vm-{n}", GpuRequest(1))
                break
            except GpuUnavailable:
                await asyncio.sleep(0.005)
        for unit in lease.units:
            if unit.id in holding:
                clashes.append(unit.id)
            holding[unit.id] = lease.owner
        most = max(most, len(holding))
        await asyncio.sleep(0.02)
        for unit in lease.units:
            del holding[unit.id]
        await alloc.release(lease)
        done.append(lease.owner)

    await asyncio.gather(*(job(n) for n in range(6)))
    assert clashes == []
    assert len(done) == 6
    assert most == 2
    assert alloc.stats()["free"] == 2
    assert host.driver(RTX) == "nvidia"
    # A model request only gets that model.
    lease = await alloc.acquire("vm-model", GpuRequest(1, "10de:2330"))
    assert [u.id for u in lease.units] == [H100]
    with pytest.raises(GpuUnavailable):
        await alloc.acquire("vm-other", GpuRequest(1, "10de:2330"))
    await alloc.release(lease)


async def test_failed_second_device_gives_back_the_first(host: FakeHost,
                                                         tmp_path: Path) -> None:
    alloc = GpuAllocator(source(host, devices=[RTX, H100]), tmp_path / "gpu.json")
    host.refuse.add(H100)  # vfio-pci will not take the H100
    with pytest.raises(GpuBindError, match=f"gpu {H100}: vfio-pci did not take it"):
        await alloc.acquire("vm-1", GpuRequest(2))
    assert (host.driver(RTX), host.driver(RTX_AUDIO)) == ("nvidia", "snd_hda_intel")
    assert alloc.leased_to("vm-1") == []
    assert alloc.stats()["free"] == 2
    assert json.loads((tmp_path / "gpu.json").read_text())["leases"] == []


async def test_recovery_releases_devices_of_dead_vms(host: FakeHost, tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    alloc = GpuAllocator(source(host, devices=[RTX, H100]), state)
    await alloc.acquire("vm-dead", GpuRequest(1, "10de:2684"))
    await alloc.acquire("vm-live", GpuRequest(1, "10de:2330"))
    recorded = json.loads(state.read_text())
    assert {r["owner"] for r in recorded["leases"]} == {"vm-dead", "vm-live"}
    assert os.stat(state).st_mode & 0o077 == 0
    # The daemon died; a new one finds the records and what is still bound to vfio.
    assert host.driver(RTX) == "vfio-pci"
    fresh = GpuAllocator(source(host, devices=[RTX, H100]), state)
    report = await fresh.recover(live_owners=["vm-live"])
    assert report.released == (RTX,)
    assert (host.driver(RTX), host.driver(RTX_AUDIO)) == ("nvidia", "snd_hda_intel")
    assert host.driver(H100) == "vfio-pci"  # a live VM still has it
    assert fresh.leased_to("vm-live") == [H100]
    assert [r["owner"] for r in json.loads(state.read_text())["leases"]] == ["vm-live"]


async def test_recovery_keeps_a_device_a_process_still_holds(host: FakeHost,
                                                             tmp_path: Path) -> None:
    state = tmp_path / "gpu.json"
    await GpuAllocator(source(host, devices=[RTX]), state).acquire("vm-1", GpuRequest(1))
    proc = tmp_path / "proc"
    (proc / "4242/fd").mkdir(parents=True)
    (proc / "4242/fd/17").symlink_to("/dev/vfio/2")
    fresh = GpuAllocator(source(host, devices=[RTX]), state,
                         holders=lambda unit: vfio_holders(unit.group, proc))
    report = await fresh.recover(live_owners=[])
    assert report.released == ()
    assert report.held == {RTX: (4242,)}
    assert host.driver(RTX) == "vfio-pci"


# -- what QEMU is told


async def test_device_args_for_vfio_and_edu(host: FakeHost) -> None:
    src = source(host, devices=[RTX])
    args = src.device_args(src.units()[0], ["rp0"], "gpu0")
    assert args == [
        {"driver": "vfio-pci", "host": RTX_AUDIO, "bus": "rp0", "addr": "0.1", "id": "gpu0-0"},
        {"driver": "vfio-pci", "host": RTX, "bus": "rp0", "addr": "0.0", "id": "gpu0-1",
         "multifunction": "on"},
    ]
    assert device_option(args[1]) == \
        f"vfio-pci,host={RTX},bus=rp0,addr=0.0,id=gpu0-1,multifunction=on"
    edu = EduSource(2)
    alloc_units = [u.model for u in edu.units()]
    assert alloc_units == ["1234:11e8", "1234:11e8"]
    assert edu.device_args(edu.units()[1], ["rp3"], "gpu1") == \
        [{"driver": "edu", "bus": "rp3", "id": "gpu1-0"}]


# -- configuration


def test_gpu_config(tmp_path: Path) -> None:
    path = tmp_path / "snapfleet.toml"
    path.write_text(
        '[gpu]\ndevices = ["01:00.0", "0000:02:00.0"]\n'
        '[profiles.cuda]\ngpu = "10DE:2684"\nmemory_mib = 8192\n'
        '[profiles.two]\ngpus = 2\ngpu_mode = "coldboot"\n'
        '[profiles.default]\n'
    )
    loaded = load_settings(path)
    assert loaded.gpu.devices == [RTX, H100]
    cuda = loaded.profile("cuda")
    assert cuda.gpu_request() == GpuRequest(1, "10de:2684")
    assert cuda.gpu_mode == "hotplug"
    assert loaded.profile("two").gpu_request() == GpuRequest(2)
    assert loaded.profile().gpu_request() is None


@pytest.mark.parametrize(("toml", "key", "words"), [
    ('[profiles.default]\ngpu = "nvidia"\n', "profiles.default.gpu", "vendor:device"),
    ('[profiles.default]\ngpu = "10de:2684"\ngpus = 0\n', "profiles.default", "gpus = 0"),
    ('[profiles.default]\ngpu_mode = "warm"\n', "profiles.default.gpu_mode", "hotplug"),
    ('[gpu]\ndevices = ["01:00"]\n', "gpu.devices", "PCI address"),
    ('[gpu]\nsource = "edu"\ndevices = ["01:00.0"]\n', "gpu", "gpu.source is 'edu'"),
])
def test_bad_gpu_config_is_one_clear_error(tmp_path: Path, toml: str, key: str,
                                           words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert err.value.key.startswith(key)
    assert words in str(err.value)
