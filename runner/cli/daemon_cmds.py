"""`snapfleet serve`: run the fleet daemon (its clients are in `runner.cli.client_cmds`)."""

from __future__ import annotations

import argparse

from runner.log import configure_logging


async def serve(args: argparse.Namespace) -> int:
    from runner import compose
    from runner.cli.engine_cmds import settings_of

    settings = settings_of(args)
    # JSON lines to stdout for journald (console output on a terminal).
    configure_logging(args.log_level if args.log_level != "warning" else "info", stream="stdout")
    await compose.daemon(settings).serve()
    return 0
