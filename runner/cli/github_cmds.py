"""`snapfleet github check`: what is wrong with the GitHub side of the config, and the fix."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import TextIO

from runner.config import load_settings
from runner.errors import ConfigError
from runner.forge.github.check import Checker, Finding, scale_set_findings

EXIT_PROBLEMS = 1


async def github(args: argparse.Namespace) -> int:
    """``snapfleet github check``: exit 0 when every check passed, 1 when one did not."""
    settings = load_settings(args.config)
    config = settings.github
    if config is None:
        raise ConfigError("github", "no [github] section in the config: nothing to check")
    labels = {name: profile.labels for name, profile in settings.profiles.items()}
    host = config.host or socket.gethostname()
    checker = Checker(config, labels=labels, host=host, webhook_url=args.webhook_url)
    out = sys.stdout
    print(f"GitHub at {config.api_url}, {config.mode} mode, scopes {', '.join(config.scopes)}",
          file=out)
    # PyGithub blocks: the checks run in a thread, printed as they come.
    findings = await asyncio.to_thread(lambda: [report(f, out) for f in checker.run()])
    if config.mode == "scaleset" and all(f.ok for f in findings):
        findings += [report(f, out) for f in await scale_set_findings(
            config, labels=labels, host=host)]
    problems = sum(1 for f in findings if not f.ok)
    print(f"{problems} problem{'s' if problems != 1 else ''} found" if problems else
          "all checks passed", file=out)
    return EXIT_PROBLEMS if problems else 0


def report(finding: Finding, out: TextIO) -> Finding:
    """Print one finding (problems with their fix) and hand it back."""
    print(f"{'ok' if finding.ok else 'PROBLEM':8}{finding.what}", file=out, flush=True)
    if finding.fix:
        print(f"{'':8}fix: {finding.fix}", file=out, flush=True)
    return finding
