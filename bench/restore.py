"""Cold boot vs snapshot restore, side by side in one run.

For each run: time from "start" to the first output of a command in the guest,
for a cold boot of the image and for a restore from its snapshot, interleaved
so machine noise hits both alike. Then the host memory (PSS) of idle clones.

    .venv/bin/python -m bench.restore [--runs 20] [--clones 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._stats import first_output_ms, log, percentiles, print_table
from runner import compose
from runner.config import load_settings


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


async def bench(runs: int, clones: int, cache_dir: Path, log: Any) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="sf-bench-", dir="/tmp"))
    settings = load_settings(
        None,
        paths={"cache_dir": cache_dir, "state_dir": state_dir},
        net={"egress": False, "dns": []},
    )
    async with compose.engine(settings) as engine:
        profile = settings.profile()
        snapshot = await engine.snapshot(profile, log)
        image = await engine.image(profile, log)
        spec = engine.spec(profile, image)
        cold: list[float] = []
        restore: list[float] = []
        names = ("setup", "spawn", "load", "agent", "total")
        phases: dict[str, list[float]] = {k: [] for k in names}
        for i in range(runs):
            started = time.monotonic()
            machine = await engine.hypervisor.boot(spec, image.rootfs)
            cold.append(await first_output_ms(machine, started))
            await machine.destroy()

            started = time.monotonic()
            machine = await engine.restore(snapshot)
            restore.append(await first_output_ms(machine, started))
            for name in phases:
                phases[name].append(machine.timings.get(name, 0.0) * 1000)
            await machine.destroy()
            log(f"run {i + 1}/{runs}: cold {cold[-1]:.0f} ms, restore {restore[-1]:.0f} ms")

        idle = [await engine.restore(snapshot) for _ in range(clones)]
        try:
            await asyncio.sleep(2)  # let them settle into idle
            pss = [pss_mib(m.pid) for m in idle if m.pid is not None]
        finally:
            for m in idle:
                await m.destroy()
    shutil.rmtree(state_dir, ignore_errors=True)
    cold_p, restore_p = percentiles(cold), percentiles(restore)
    return {
        "accel": engine.accel.accel,
        "qemu": engine.vmm.version,
        "memory_mib": profile.memory_mib,
        "cold_boot_ms": cold_p,
        "restore_ms": restore_p,
        "speedup_p50": round(cold_p["p50"] / restore_p["p50"], 1),
        "restore_phases_ms": {k: round(statistics.mean(v), 1) for k, v in phases.items()},
        "clone_pss_mib": {
            "mean": round(statistics.mean(pss), 1),
            "max": round(max(pss), 1),
            "clones": len(pss),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--clones", type=int, default=4, help="idle clones for the PSS figure")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()


    result = asyncio.run(bench(args.runs, args.clones, args.cache_dir, log))
    if args.json:
        print(json.dumps(result))
        return
    print(f"accel {result['accel']}, QEMU {result['qemu']}, {result['memory_mib']} MiB guest")
    print_table("", [(name[:-3].replace("_", " "), result[name])
                     for name in ("cold_boot_ms", "restore_ms")])
    print(f"restore is {result['speedup_p50']}x faster (p50)")
    print(
        "restore phases (mean ms): "
        + ", ".join(f"{k} {v}" for k, v in result["restore_phases_ms"].items())
    )
    pss = result["clone_pss_mib"]
    print(
        f"idle clone PSS: mean {pss['mean']} MiB, max {pss['max']} MiB over {pss['clones']} clones"
    )


if __name__ == "__main__":
    main()
