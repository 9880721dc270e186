"""Two commits side by side in one run: a bench module, rounds interleaved A, B, A, B.

These machines are noisy, so figures from separate runs are not comparable;
interleaving gives both commits the same noise. Each commit runs from a
temporary git worktree (its own ``runner`` package, the shared venv's
libraries); every numeric figure of the module's ``--json`` output is
collected and the medians over rounds are printed side by side.

    .venv/bin/python -m bench.compare --base HEAD~3 [--head WORKTREE] [--rounds 3] \\
        bench.restore --runs 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON value, by dotted path."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def checkout(rev: str, into: Path) -> Path:
    """A worktree of ``rev`` (or this checkout itself for ``WORKTREE``)."""
    if rev == "WORKTREE":
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev],
                   check=True, capture_output=True)
    return into


def run_once(tree: Path, module: str, args: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", module, *args, "--json"], cwd=tree,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{module} failed in {tree}:\n{done.stderr[-2000:]}")
    return flatten(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", default="WORKTREE", help="git revision (default: this tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="sf-compare-"))
    trees = {}
    try:
        trees = {"base": checkout(opts.base, scratch / "base"),
                 "head": checkout(opts.head, scratch / "head")}
        samples: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
        for round_ in range(opts.rounds):
            for side in (("base", "head") if round_ % 2 == 0 else ("head", "base")):
                print(f"round {round_ + 1}/{opts.rounds}: {side}", file=sys.stderr, flush=True)
                for key, value in run_once(trees[side], opts.module, opts.args).items():
                    samples[side].setdefault(key, []).append(value)
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    keys = sorted(set(samples["base"]) & set(samples["head"]))
    medians = {k: {"base": statistics.median(samples["base"][k]),
                   "head": statistics.median(samples["head"][k])} for k in keys}
    width = max((len(k) for k in keys), default=10)
    print(f"{opts.module} {' '.join(opts.args)}: medians over {opts.rounds} interleaved rounds")
    print(f"{'figure':{width}}  {'base ' + opts.base:>16}  {'head ' + opts.head:>16}")
    for key in keys:
        m = medians[key]
        print(f"{key:{width}}  {m['base']:>16.1f}  {m['head']:>16.1f}")
    if opts.json:
        print(json.dumps({"module": opts.module, "base": opts.base, "head": opts.head,
                          "rounds": opts.rounds, "medians": medians}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
