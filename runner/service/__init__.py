"""The fleet daemon: job sources, scheduling, state, recovery, metrics."""
