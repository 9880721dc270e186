"""The daemon under load, measured from outside like a user sees it.

0. The daemon's own overhead: queue (the API call) → the engine's restore call,
   on the in-process toy VM backend (tests/backends/toy.py), so no VM's time
   hides it.
1. Queue → first output of a local job, with the warm pool and without, in one
   run (two profiles of the same shape, one with `warm = 2`), interleaved.
2. Jobs per minute the daemon sustains with trivial jobs.
3. The daemon's RSS after 10 jobs and after 200 (growth would be a leak).

    .venv/bin/python -m bench.daemon [--latency-runs 20] [--jobs 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._daemon import first_output_ms, percentiles, running_daemon
from bench._stats import log, print_table
from runner.api.client import ApiClient


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def wait_all(api: ApiClient, ids: list[str]) -> None:
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            if (await api.job(job_id))["state"] not in ("queued", "starting", "running"):
                pending.discard(job_id)
        await asyncio.sleep(0.25)


async def daemon_overhead(runs: int) -> dict[str, float]:
    """Queue → engine restore call, ms, on the toy backend (p50/p95)."""
    from runner import compose
    from tests.backends import toy

    samples = []
    with tempfile.TemporaryDirectory(prefix="sf-overhead-") as tmp:
        settings = toy.toy_settings(Path(tmp))
        notifier = toy.ReadyNotifier()
        daemon = compose.daemon(settings, notifier=notifier)
        serving = asyncio.create_task(daemon.serve())
        await notifier.is_ready.wait()
        hv = daemon.engine.hypervisor
        assert isinstance(hv, toy.ToyHypervisor)
        ended = asyncio.Event()
        daemon.subscribe(lambda _job: ended.set())
        try:
            async with ApiClient(settings.daemon.api_socket) as api:
                for _ in range(runs + 3):  # the first few warm up imports and caches
                    hv.called.clear()
                    ended.clear()
                    started = time.monotonic()
                    await api.submit({"script": "true"})
                    await hv.called.wait()
                    samples.append((hv.calls[-1] - started) * 1000)
                    await ended.wait()
        finally:
            daemon.stop()
            await serving
    return percentiles(samples[3:])


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    log(f"daemon overhead: {args.latency_runs * 5} jobs on the toy backend")
    overhead = await daemon_overhead(args.latency_runs * 5)
    with running_daemon(args.cache_dir, args.concurrency, log) as (root, proc):
        async with ApiClient(root / "api.sock") as api:
            log("warming up (the first job builds the snapshot if needed)")
            await first_output_ms(api, "default")
            await asyncio.sleep(3)  # let the pool fill
            warm, cold = [], []
            for i in range(args.latency_runs):
                warm.append(await first_output_ms(api, "warm"))
                cold.append(await first_output_ms(api, "default"))
                await asyncio.sleep(0.5)  # pool refill between runs
                log(f"latency {i + 1}/{args.latency_runs}: warm {warm[-1]:.0f} ms, "
                    f"cold {cold[-1]:.0f} ms")
            log(f"throughput: {args.jobs} trivial jobs, {args.concurrency} at a time")
            ids = [(await api.submit({"script": "true"}))["id"] for _ in range(10)]
            await wait_all(api, ids)
            rss_10 = rss_mib(proc.pid)
            started = time.monotonic()
            ids = [(await api.submit({"script": "true"}))["id"] for _ in range(args.jobs - 10)]
            await wait_all(api, ids)
            elapsed = time.monotonic() - started
            rss_200 = rss_mib(proc.pid)
    return {
        "daemon_overhead_ms": overhead,
        "queue_to_first_output_ms": {"warm_pool": percentiles(warm), "no_pool": percentiles(cold)},
        "jobs_per_minute": round((args.jobs - 10) / elapsed * 60, 1),
        "concurrency": args.concurrency,
        "daemon_rss_mib": {"after_10": round(rss_10, 1), f"after_{args.jobs}": round(rss_200, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    result = asyncio.run(bench(args, log))
    if args.json:
        print(json.dumps(result))
        return
    over = result["daemon_overhead_ms"]
    print(f"daemon overhead (queue → engine call): p50 {over['p50']} ms, p95 {over['p95']} ms, "
          f"n {over['n']}")
    lat = result["queue_to_first_output_ms"]
    print_table("queue → first output",
                [(name.replace("_", " "), lat[name]) for name in ("warm_pool", "no_pool")])
    print(f"throughput: {result['jobs_per_minute']} jobs/min at concurrency "
          f"{result['concurrency']}")
    rss = result["daemon_rss_mib"]
    print("daemon RSS: " + ", ".join(f"{k.replace('_', ' ')} {v} MiB" for k, v in rss.items()))


if __name__ == "__main__":
    main()
