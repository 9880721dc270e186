"""Shared by the benches: percentiles, their table, progress lines and the first-output probe."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping

from runner.agent.messages import Command
from runner.vm.backend import Machine


def percentiles(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": round(pick(0.5), 1), "p95": round(pick(0.95), 1), "n": len(ordered)}


def log(message: str) -> None:
    """A progress line: on stderr, so stdout stays the figures (and the JSON last)."""
    print(message, file=sys.stderr, flush=True)


def print_table(heading: str, rows: Iterable[tuple[str, Mapping[str, float | int]]]) -> None:
    """Print ``percentiles`` results as aligned rows under ``heading``."""
    rows = list(rows)
    width = max(len(heading), *(len(label) for label, _ in rows)) + 2
    print(f"{heading:{width}}{'p50 ms':>10}{'p95 ms':>10}{'n':>5}")
    for label, r in rows:
        print(f"{label:{width}}{r['p50']:>10}{r['p95']:>10}{r['n']:>5}")


async def first_output_ms(machine: Machine, started: float) -> float:
    """Milliseconds from ``started`` until `echo ready` in the guest printed something."""
    session = await machine.exec(Command(argv=["echo", "ready"]))
    elapsed = float("nan")
    async for _chunk in session:
        elapsed = (time.monotonic() - started) * 1000
        break
    await session.wait()
    return elapsed
