"""GitLab custom executor: how long its steps take, as gitlab-runner sees them.

Runs `snapfleet gitlab-executor prepare`, `run` and `cleanup` as separate
processes, as gitlab-runner does, for N jobs per profile (hot pool, warm pool,
none), interleaved, each prepare once the pools are full again. Reports each
step's wall time (process start to exit, what gitlab-runner waits for) and the
restore time the daemon reports, p50/p95.

Then what a step costs before it does anything, with no daemon to talk to:
each step's wall time (`config` completes; the others stop at "cannot reach the
daemon"), bare `python -c pass` for reference, and each step's imports as
``python -X importtime`` counts them (after `site`; importtime's own overhead
inflates these a little). Step processes may write bytecode caches, as an
installed package has them.

    .venv/bin/python -m bench.gitlab_prepare [--runs 20] [--json]

``--json`` keys: ``prepare_wall_ms`` and ``restore_ms`` ({"hot_pool", "warm_pool",
"no_pool"}: {"p50", "p95", "n"}), ``run_wall_ms`` and ``cleanup_wall_ms`` (hot
profile), ``start_ms`` ({"python", "config", "prepare", "run", "cleanup"}) and
``imports_ms`` ({"config", "prepare", "run", "cleanup"}).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._daemon import percentiles, running_daemon
from bench._stats import log, print_table
from runner.api.local import DaemonClient

PROFILES = {"hot_pool": "hot", "warm_pool": "warm", "no_pool": "default"}
HOT = "[profiles.hot]\nhot = 2\n"
STEPS = ("config", "prepare", "run", "cleanup")
# Measured as shipped: bytecode cached (a stale PYTHONDONTWRITEBYTECODE would
# make every step compile its modules).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def step(config: Path, action: str, job: int, profile: str, *extra: str,
         python_flags: tuple[str, ...] = (), check: bool = True
         ) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**ENV, "CUSTOM_ENV_CI_JOB_ID": str(job), "CUSTOM_ENV_CI_RUNNER_ID": "1",
           "CUSTOM_ENV_SNAPFLEET_PROFILE": profile, "SYSTEM_FAILURE_EXIT_CODE": "2",
           "BUILD_FAILURE_EXIT_CODE": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, *python_flags, "-m", "runner.cli", "--config", str(config),
         "gitlab-executor", action, *extra],
        env=env, capture_output=True, text=True, timeout=300, check=check,
    )
    return (time.monotonic() - started) * 1000, done


def pools_full(api: DaemonClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = api.status()["pools"]
        if all(p["hot"] >= p["hot_target"] and p["warm"] >= p["warm_target"]
               for p in pools.values()):
            return
        time.sleep(0.02)
    raise RuntimeError(f"pools not full after {timeout}s: {pools}")


def jobs(runs: int, cache_dir: Path, log: Any) -> dict[str, Any]:
    wall: dict[str, list[float]] = {k: [] for k in PROFILES}
    restore: dict[str, list[float]] = {k: [] for k in PROFILES}
    run_wall: list[float] = []
    cleanup_wall: list[float] = []
    allowed = {"SNAPFLEET_GITLAB__ALLOWED_PROFILES": json.dumps(list(PROFILES.values()))}
    with running_daemon(cache_dir, 2, log, extra_toml=lambda _r: HOT, env=allowed) as (root, _p):
        config = root / "config.toml"
        script = root / "build_script"
        script.write_text("#!/usr/bin/env bash\necho built\n")
        api = DaemonClient(root / "api.sock")
        step(config, "prepare", 0, "default")  # builds the snapshot on a fresh cache
        step(config, "cleanup", 0, "default")
        pools_full(api, 600)
        order = list(PROFILES)
        for i in range(runs):
            for variant in order[i % 3:] + order[:i % 3]:
                profile = PROFILES[variant]
                job = 3 * i + order.index(variant) + 1
                pools_full(api)
                ms, done = step(config, "prepare", job, profile)
                wall[variant].append(ms)
                match = re.search(r"in (\d+) ms", done.stdout)
                restore[variant].append(float(match.group(1)) if match else float("nan"))
                ms, done = step(config, "run", job, profile, str(script), "build_script")
                if done.stdout != "built\n":
                    raise RuntimeError(f"run printed {done.stdout!r}: {done.stderr}")
                ms_cleanup, _ = step(config, "cleanup", job, profile)
                if variant == "hot_pool":
                    run_wall.append(ms)
                    cleanup_wall.append(ms_cleanup)
            log(f"run {i + 1}/{runs}: prepare " + ", ".join(
                f"{v.replace('_', ' ')} {wall[v][-1]:.0f} ms" for v in PROFILES))
    return {
        "prepare_wall_ms": {k: percentiles(v) for k, v in wall.items()},
        "restore_ms": {k: percentiles(v) for k, v in restore.items()},
        "run_wall_ms": percentiles(run_wall),
        "cleanup_wall_ms": percentiles(cleanup_wall),
    }


def imports_ms(stderr: str) -> float:
    """What ``-X importtime`` counts for the imports after start-up (`site`)."""
    total = 0
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if name.startswith(" ") and not name.startswith("  ") and name.strip() != "site":
            total += int(cumulative)
    return total / 1000


def start_costs(runs: int) -> dict[str, Any]:
    """Each step's wall time and imports with no daemon behind the socket."""
    scratch = Path(tempfile.mkdtemp(prefix="sf-bstart-", dir="/tmp"))
    config = scratch / "config.toml"
    config.write_text(f'[daemon]\napi_socket = "{scratch}/absent.sock"\n')
    script = scratch / "script"
    script.write_text("true\n")
    extra = {"run": (str(script), "build_script")}
    start: dict[str, list[float]] = {k: [] for k in ("python", *STEPS)}
    imports: dict[str, list[float]] = {k: [] for k in STEPS}
    try:
        for action in STEPS:  # warm the bytecode cache
            step(config, action, 1, "default", *extra.get(action, ()), check=False)
        for _ in range(runs):
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", "pass"], env=ENV, check=True)
            start["python"].append((time.monotonic() - started) * 1000)
            for action in STEPS:
                ms, _ = step(config, action, 1, "default", *extra.get(action, ()), check=False)
                start[action].append(ms)
                _, done = step(config, action, 1, "default", *extra.get(action, ()),
                               python_flags=("-X", "importtime"), check=False)
                imports[action].append(imports_ms(done.stderr))
    finally:
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
    return {"start_ms": {k: percentiles(v) for k, v in start.items()},
            "imports_ms": {k: percentiles(v) for k, v in imports.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--start-runs", type=int, default=30,
                        help="samples of each step's start-up cost")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    # Start-up costs first, while no VM of this bench is running.
    costs = start_costs(args.start_runs)
    result = {**jobs(args.runs, args.cache_dir, log), **costs}
    rows: list[tuple[str, dict[str, Any]]] = []
    for what in ("prepare_wall_ms", "restore_ms"):
        for variant in PROFILES:
            rows.append((f"{what[:-3].replace('_', ' ')} ({variant.replace('_', ' ')})",
                         result[what][variant]))
    rows += [("run wall (hot pool)", result["run_wall_ms"]),
             ("cleanup wall (hot pool)", result["cleanup_wall_ms"]),
             ("python -c pass", result["start_ms"]["python"])]
    rows += [(f"{action}, no daemon: wall", result["start_ms"][action]) for action in STEPS]
    rows += [(f"{action}: imports (importtime)", result["imports_ms"][action])
             for action in STEPS]
    print_table("", rows)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
