"""GitLab custom executor: how long `prepare` takes, with the warm pool and without.

Runs `snapfleet gitlab-executor prepare` and `cleanup` as separate processes,
as gitlab-runner does, for N jobs per variant, interleaved. Reports the
prepare step's wall time (process start to exit, what gitlab-runner waits for)
and the restore time the daemon reports, p50/p95.

    .venv/bin/python -m bench.gitlab_prepare [--runs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._daemon import percentiles, running_daemon


def step(config: Path, action: str, job: int, profile: str) -> tuple[float, str]:
    env = {**os.environ, "CUSTOM_ENV_CI_JOB_ID": str(job), "CUSTOM_ENV_CI_RUNNER_ID": "1",
           "CUSTOM_ENV_SNAPFLEET_PROFILE": profile, "SYSTEM_FAILURE_EXIT_CODE": "2"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "runner.cli", "--config", str(config), "gitlab-executor", action],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    return (time.monotonic() - started) * 1000, done.stdout


def bench(runs: int, cache_dir: Path, log: Any) -> dict[str, Any]:
    wall: dict[str, list[float]] = {"warm": [], "default": []}
    restore: dict[str, list[float]] = {"warm": [], "default": []}
    with running_daemon(cache_dir, 2, log) as (root, _proc):
        config = root / "config.toml"
        step(config, "prepare", 0, "default")  # builds the snapshot on a fresh cache
        step(config, "cleanup", 0, "default")
        time.sleep(3)  # let the pool fill
        for i in range(runs):
            for profile in ("warm", "default"):
                job = 2 * i + (profile == "warm") + 1
                ms, out = step(config, "prepare", job, profile)
                wall[profile].append(ms)
                match = re.search(r"in (\d+) ms", out)
                restore[profile].append(float(match.group(1)) if match else float("nan"))
                step(config, "cleanup", job, profile)
            time.sleep(0.5)
            log(f"run {i + 1}/{runs}: prepare warm {wall['warm'][-1]:.0f} ms, "
                f"no pool {wall['default'][-1]:.0f} ms")
    return {
        "prepare_wall_ms": {"warm_pool": percentiles(wall["warm"]),
                            "no_pool": percentiles(wall["default"])},
        "restore_ms": {"warm_pool": percentiles(restore["warm"]),
                       "no_pool": percentiles(restore["default"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = bench(args.runs, args.cache_dir, lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'':28}{'p50 ms':>10}{'p95 ms':>10}{'n':>5}")
    for what in ("prepare_wall_ms", "restore_ms"):
        for variant in ("warm_pool", "no_pool"):
            r = result[what][variant]
            label = f"{what[:-3].replace('_', ' ')} ({variant.replace('_', ' ')})"
            print(f"{label:28}{r['p50']:>10}{r['p95']:>10}{r['n']:>5}")


if __name__ == "__main__":
    main()
