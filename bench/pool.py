"""Restore with the warm pool vs without, side by side in one run.

For each run: time from "start" to the first output of ``echo ready`` in the
guest, once through ``Engine.restore`` taking a machine from a warm pool of one
(the QEMU process already waiting in ``-incoming defer``) and once preparing
the machine on the spot (directory, namespace, overlay, QEMU spawn). Runs are
interleaved, alternating which goes first, so machine noise hits both alike.
Each measurement starts with the pool full and no refill under way; the refill
a warm restore triggers runs alongside it, as it would in production.

    .venv/bin/python -m bench.pool [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench._stats import first_output_ms, log, percentiles, print_table
from runner import compose
from runner.config import Profile, load_settings
from runner.engine import Engine
from runner.snapshots import Snapshot
from runner.vm.backend import Machine

PHASES = ("setup", "spawn", "load", "agent", "total")


async def pool_full(engine: Engine, snapshot: Snapshot, timeout: float = 60.0) -> None:
    """Wait until the pool holds its target and no refill is running."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.pool.stats()[snapshot.key]
        if s.idle >= s.target and s.preparing == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool did not refill within {timeout:.0f}s: {s}")
        await asyncio.sleep(0.01)


class Series:
    """Latencies and phase timings of one way of restoring."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.phases: dict[str, list[float]] = {k: [] for k in PHASES}

    async def measure(self, restore: Callable[[], Awaitable[Machine]]) -> Machine:
        started = time.monotonic()
        machine = await restore()
        try:
            self.ms.append(await first_output_ms(machine, started))
            for name in PHASES:
                self.phases[name].append(machine.timings.get(name, 0.0) * 1000)
        finally:
            await machine.destroy()
        return machine

    def mean_phases(self) -> dict[str, float]:
        return {k: round(statistics.mean(v), 1) for k, v in self.phases.items()}


async def bench(runs: int, cache_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="sf-bench-", dir="/tmp"))
    settings = load_settings(
        None,
        paths={"cache_dir": cache_dir, "state_dir": state_dir},
        net={"egress": False, "dns": []},
    )
    warm, cold = Series(), Series()
    hits = 0
    try:
        async with compose.engine(settings) as engine:
            profile = settings.profile()
            snapshot = await engine.snapshot(profile, log)
            engine.warm("bench", Profile(warm=1), snapshot)

            async def with_pool() -> Machine:
                return await engine.restore(snapshot)

            async def without_pool() -> Machine:
                return await engine.hypervisor.restore(snapshot)

            for i in range(runs):
                # Alternate the order so neither side always runs right after the other.
                order = [(warm, with_pool), (cold, without_pool)]
                for series, restore in order if i % 2 == 0 else order[::-1]:
                    await pool_full(engine, snapshot)
                    machine = await series.measure(restore)
                    if series is warm:
                        hits += int(machine.pooled)
                log(f"run {i + 1}/{runs}: warm {warm.ms[-1]:.1f} ms, cold {cold.ms[-1]:.1f} ms")
            accel, qemu = engine.accel.accel, engine.vmm.version
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    warm_p, cold_p = percentiles(warm.ms), percentiles(cold.ms)
    return {
        "accel": accel,
        "qemu": qemu,
        "memory_mib": profile.memory_mib,
        "warm_ms": warm_p,
        "cold_ms": cold_p,
        "warm_hits": hits,
        "saved_p50_ms": round(cold_p["p50"] - warm_p["p50"], 1),
        "warm_phases_ms": warm.mean_phases(),
        "cold_phases_ms": cold.mean_phases(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()


    result = asyncio.run(bench(args.runs, args.cache_dir, log))
    if args.json:
        print(json.dumps(result))
        return
    print(f"accel {result['accel']}, QEMU {result['qemu']}, {result['memory_mib']} MiB guest")
    print_table("restore → first output", [("warm pool", result["warm_ms"]),
                                            ("cold (prepare now)", result["cold_ms"])])
    print(f"pool hits {result['warm_hits']}/{result['warm_ms']['n']}")
    print(f"the pool saves {result['saved_p50_ms']} ms at p50")
    for label, name in (("warm", "warm_phases_ms"), ("cold", "cold_phases_ms")):
        phases = ", ".join(f"{k} {v}" for k, v in result[name].items())
        print(f"{label} phases (mean ms): {phases}")


if __name__ == "__main__":
    main()
