"""A GPU job's start: restore + hot-plug vs cold boot with the device, in one run.

QEMU's emulated ``edu`` device (1234:11e8) stands in for the GPU (``[gpu]
source = "edu"``); everything else is the path a real GPU job takes: the
allocator, `GpuClaim`, ``Machine.attach`` (QMP ``device_add`` on an empty root
port of a GPU snapshot) and the guest check through the agent. Interleaved
(the order alternates each round) so machine noise hits both alike:

* ``restore_plug_ms``: restore start → the guest shows the plugged device;
* ``coldboot_device_ms``: cold boot (device on the command line) start → the
  guest shows the device;
* ``visible_after_restore_ms``: the restored clone answers → the guest shows
  the plugged device (the plug's own cost on the critical path).

    .venv/bin/python -m bench.gpu [--runs 10] [--json]

``--json`` prints ``{"restore_plug_ms": {"p50","p95","n"}, "coldboot_device_ms": {…},
"visible_after_restore_ms": {…}}`` as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._stats import log, percentiles, print_table
from runner import compose
from runner.config import load_settings
from runner.engine import Engine
from runner.gpu.plug import GpuClaim


def _claim(engine: Engine) -> GpuClaim:
    assert engine.gpus is not None
    request = engine.settings.profile("gpu").gpu_request()
    assert request is not None
    return GpuClaim(engine.gpus, request,
                    hotplug_timeout_s=engine.settings.gpu.hotplug_timeout_s)


async def hotplug_once(engine: Engine) -> tuple[float, float]:
    """(restore start → device seen, clone ready → device seen), in ms."""
    profile = engine.settings.profile("gpu")
    snapshot = await engine.snapshot(profile, print)
    claim = _claim(engine)
    started = time.monotonic()
    claim.start()
    machine = await engine.restore(snapshot, use_pool=False)
    try:
        ready = time.monotonic()
        await claim.attach(machine)
        seen = time.monotonic()
    finally:
        await machine.destroy()
        await claim.release()
    return (seen - started) * 1000, (seen - ready) * 1000


async def coldboot_once(engine: Engine) -> float:
    """Cold boot with the device attached → device seen, in ms."""
    profile = engine.settings.profile("gpu")
    image = await engine.image(profile, print)
    claim = _claim(engine)
    started = time.monotonic()
    machine = await engine.boot(profile, image, devices=await claim.devices())
    try:
        await claim.attach(machine, plug=False)
        seen = time.monotonic()
    finally:
        await machine.destroy()
        await claim.release()
    return (seen - started) * 1000


async def bench(runs: int, cache_dir: Path, log: Any) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="sf-bench-gpu-", dir="/tmp"))
    settings = load_settings(
        None,
        paths={"cache_dir": cache_dir, "state_dir": state_dir},
        net={"egress": False, "dns": []},
        gpu={"source": "edu", "edu_devices": 1},
        profiles={"default": {}, "gpu": {"gpus": 1}},
    )
    restore_plug: list[float] = []
    visible: list[float] = []
    cold: list[float] = []
    try:
        async with compose.engine(settings) as engine:
            log("warming up (the first run builds the GPU snapshot if needed)")
            await hotplug_once(engine)
            for i in range(runs):
                for kind in (("hot", "cold") if i % 2 == 0 else ("cold", "hot")):
                    if kind == "hot":
                        total, after = await hotplug_once(engine)
                        restore_plug.append(total)
                        visible.append(after)
                    else:
                        cold.append(await coldboot_once(engine))
                log(f"run {i + 1}/{runs}: restore+plug {restore_plug[-1]:.0f} ms"
                    f" (visible {visible[-1]:.0f} ms after the clone answered),"
                    f" cold boot with device {cold[-1]:.0f} ms")
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return {
        "restore_plug_ms": percentiles(restore_plug),
        "coldboot_device_ms": percentiles(cold),
        "visible_after_restore_ms": percentiles(visible),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    result = asyncio.run(bench(args.runs, args.cache_dir, log))
    print_table("start → guest shows the device", [(label, result[key]) for key, label in (
        ("restore_plug_ms", "restore + hot-plug"),
        ("coldboot_device_ms", "cold boot with the device"),
        ("visible_after_restore_ms", "  (clone answering → device)"))])
    speedup = result["coldboot_device_ms"]["p50"] / max(result["restore_plug_ms"]["p50"], 1e-9)
    print(f"restore + hot-plug is {speedup:.1f}x faster than a cold boot with the device (p50)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
