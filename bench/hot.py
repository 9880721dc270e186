"""Queued → first output of `echo hi` through the daemon: hot pool vs warm pool vs none.

Three profiles of the same shape (``hot = 2``, ``warm = 2``, no pool), measured
interleaved in one run (the order rotates each round), each job submitted
only once its pool is full again — the steady state a fleet sees between
bursts. Then two figures for what refilling costs: the hot profile's jobs
submitted back to back (so refills run beside jobs, and yield to them), and
how long the hot pool takes to be full again after a job.

    .venv/bin/python -m bench.hot [--runs 50] [--json]

``--json`` prints ``{"hot_ms": {"p50","p95","n"}, "warm_ms": {…}, "none_ms": {…},
"hot_back_to_back_ms": {…}, "hot_refill_ms": {…}}`` as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench._daemon import first_output_ms, percentiles, running_daemon
from bench._stats import log, print_table
from runner.api.client import ApiClient

PROFILES = """
[profiles.hot]
hot = 2
[profiles.none]
"""
NAMES = {"hot": "hot", "warm": "warm", "none": "none"}


async def pools_full(api: ApiClient, timeout: float = 120.0) -> float:
    """Wait until every pool holds its target; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        pools = (await api.status())["pools"]
        if all(p["hot"] >= p["hot_target"] and p["warm"] >= p["warm_target"]
               for p in pools.values()):
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise RuntimeError(f"pools not full after {timeout}s: {pools}")


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    figures: dict[str, list[float]] = {"hot": [], "warm": [], "none": []}
    back_to_back: list[float] = []
    refill: list[float] = []
    with running_daemon(args.cache_dir, 2, log, extra_toml=lambda _r: PROFILES) as (root, _p):
        async with ApiClient(root / "api.sock") as api:
            log("warming up (the first job builds the snapshot if needed)")
            await first_output_ms(api, "none", script="echo hi")
            await pools_full(api, 600)
            order = list(figures)
            for i in range(args.runs):
                for name in order[i % 3:] + order[:i % 3]:
                    await pools_full(api)
                    figures[name].append(await first_output_ms(api, NAMES[name], script="echo hi"))
                    if name == "hot":
                        refill.append(await pools_full(api) * 1000)
                log(f"round {i + 1}/{args.runs}: " + ", ".join(
                    f"{k} {v[-1]:.0f} ms" for k, v in figures.items()))
            await pools_full(api)
            for _ in range(max(4, args.runs // 5)):
                back_to_back.append(await first_output_ms(api, "hot", script="echo hi"))
    return {
        "hot_ms": percentiles(figures["hot"]),
        "warm_ms": percentiles(figures["warm"]),
        "none_ms": percentiles(figures["none"]),
        "hot_back_to_back_ms": percentiles(back_to_back),
        "hot_refill_ms": percentiles(refill),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    result = asyncio.run(bench(args, log))
    print_table("queued → first output", [(label, result[key]) for key, label in (
        ("hot_ms", "hot pool"), ("warm_ms", "warm pool"), ("none_ms", "no pool"),
        ("hot_back_to_back_ms", "hot, back to back"), ("hot_refill_ms", "hot pool full again"))])
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
