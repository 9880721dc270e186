"""Shared by the benches: percentiles and the first-output probe."""

from __future__ import annotations

import time

from runner.agent.messages import Command
from runner.vm.backend import Machine


def percentiles(samples: list[float]) -> dict[str, float | int]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": round(pick(0.5), 1), "p95": round(pick(0.95), 1), "n": len(ordered)}


async def first_output_ms(machine: Machine, started: float) -> float:
    """Milliseconds from ``started`` until `echo ready` in the guest printed something."""
    session = await machine.exec(Command(argv=["echo", "ready"]))
    elapsed = float("nan")
    async for _chunk in session:
        elapsed = (time.monotonic() - started) * 1000
        break
    await session.wait()
    return elapsed
