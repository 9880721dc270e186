"""The agent's only logger: plain lines on stderr, which is the serial console."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """One line to stderr (the serial console in a VM). Never pass env values."""
    print(f"snapfleet-agent: {message}", file=sys.stderr, flush=True)
