"""The guest-side device check: the real script, run by a real /bin/sh against real
file trees laid out like a guest's /sys/bus/pci (only the root differs), and its verdict."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from runner.gpu.guest import EXIT_MISSING, Expectation, expect, script, verdict
from runner.gpu.sysfs import GpuUnit, PciFunction

GPU = PciFunction("0000:41:00.0", "10de", "2684", "030000", "vfio-pci", "12", True)
AUDIO = PciFunction("0000:41:00.1", "10de", "22ba", "040300", "vfio-pci", "12", True)
UNIT = GpuUnit(GPU, (AUDIO, GPU))


def device(root: Path, address: str, model: str, driver: str | None = None) -> None:
    d = root / "bus/pci/devices" / address
    d.mkdir(parents=True)
    vendor, dev = model.split(":")
    (d / "vendor").write_text(f"0x{vendor}\n")
    (d / "device").write_text(f"0x{dev}\n")
    if driver is not None:
        target = root / "bus/pci/drivers" / driver
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, d / "driver")


def run(root: Path, expectation: Expectation, timeout_s: float, path: str = "/usr/bin:/bin"
        ) -> subprocess.CompletedProcess[str]:
    text = script(expectation, timeout_s).replace("/sys/bus/pci/devices", f"{root}/bus/pci/devices")
    return subprocess.run(["/bin/sh", "-c", text], capture_output=True, text=True, timeout=30,
                          env={"PATH": path})


def test_expect_counts_every_function_of_every_unit() -> None:
    assert expect([UNIT], driver=True) == Expectation(
        (("10de:22ba", 1), ("10de:2684", 1)), True)
    assert expect([UNIT, UNIT], driver=False).models == (("10de:22ba", 2), ("10de:2684", 2))


def test_bound_functions_are_reported(tmp_path: Path) -> None:
    device(tmp_path, "0000:00:01.0", "1b36:000c", "pcieport")
    device(tmp_path, "0000:01:00.0", "10de:2684", "nvidia")
    device(tmp_path, "0000:01:00.1", "10de:22ba", "snd_hda_intel")
    done = run(tmp_path, expect([UNIT], driver=True), 2)
    assert done.returncode == 0, done.stderr
    result = verdict(expect([UNIT], driver=True), done.stdout, done.returncode, 2)
    assert result.failure is None
    assert {(d.address, d.model, d.driver) for d in result.devices} == {
        ("0000:01:00.0", "10de:2684", "nvidia"), ("0000:01:00.1", "10de:22ba", "snd_hda_intel")}


def test_a_device_without_its_driver_is_not_ready(tmp_path: Path) -> None:
    device(tmp_path, "0000:01:00.0", "10de:2684")  # enumerated, no driver: image lacks it
    device(tmp_path, "0000:01:00.1", "10de:22ba", "snd_hda_intel")
    started = time.monotonic()
    done = run(tmp_path, expect([UNIT], driver=True), 0.5)
    assert done.returncode == EXIT_MISSING
    assert time.monotonic() - started < 5
    failure = verdict(expect([UNIT], driver=True), done.stdout, done.returncode, 0.5).failure
    assert failure == ("the guest did not take the hot-plugged device(s) within 0.5s: "
                       "10de:2684: present but 1 without a driver (is the GPU driver in the"
                       " image?)")


def test_an_absent_device_fails_at_the_deadline(tmp_path: Path) -> None:
    (tmp_path / "bus/pci/devices").mkdir(parents=True)
    edu = Expectation((("1234:11e8", 1),), False)
    done = run(tmp_path, edu, 0.3)
    assert done.returncode == EXIT_MISSING
    failure = verdict(edu, done.stdout, done.returncode, 0.3).failure
    assert failure is not None
    assert failure.endswith("1234:11e8: 0 of 1 present")


async def test_a_device_that_appears_later_is_seen_at_once(tmp_path: Path) -> None:
    (tmp_path / "bus/pci/devices").mkdir(parents=True)
    edu = Expectation((("1234:11e8", 1),), False)
    text = script(edu, 10).replace("/sys/bus/pci/devices", f"{tmp_path}/bus/pci/devices")
    proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", text,
                                                stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.3)
    device(tmp_path, "0000:01:00.0", "1234:11e8")  # the hot-plug lands
    plugged = time.monotonic()
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    assert time.monotonic() - plugged < 1.0
    assert out.decode() == "device 0000:01:00.0 1234:11e8 -\n"


@pytest.mark.parametrize(("smi_exit", "expected"), [(0, None), (9, "`nvidia-smi -L` failed")])
def test_nvidia_smi_must_answer_when_the_image_has_it(
    tmp_path: Path, smi_exit: int, expected: str | None
) -> None:
    device(tmp_path, "0000:01:00.0", "10de:2684", "nvidia")
    device(tmp_path, "0000:01:00.1", "10de:22ba", "snd_hda_intel")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-x)'\n"
                   f"exit {smi_exit}\n")
    smi.chmod(0o755)
    want = expect([UNIT], driver=True)
    done = run(tmp_path, want, 2, path=f"{bin_dir}:/usr/bin:/bin")
    result = verdict(want, done.stdout, done.returncode, 2)
    assert result.smi == ("GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-x)",)
    if expected is None:
        assert result.failure is None
    else:
        assert result.failure is not None
        assert expected in result.failure
