"""The ``snapfleet gitlab`` command line (kept apart from the command, whose imports
are heavy: the parser is built for every `snapfleet` invocation)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Register the ``gitlab`` command group on the top-level subparsers ``sub``."""
    group = sub.add_parser("gitlab", help="GitLab runners for the direct job source")
    actions = group.add_subparsers(dest="action", required=True)
    reg = actions.add_parser("register", help="create a runner and store its token")
    reg.add_argument("--url", required=True, help="GitLab URL, e.g. https://gitlab.example.com")
    scope = reg.add_mutually_exclusive_group(required=True)
    scope.add_argument("--group", metavar="G", help="group id or full path")
    scope.add_argument("--project", metavar="P", help="project id or full path")
    scope.add_argument("--instance", action="store_true", help="an instance runner (admin)")
    reg.add_argument("--tag", action="append", default=[], metavar="T",
                     help="a tag this runner serves (repeat); jobs are matched by tags")
    reg.add_argument("--run-untagged", action="store_true", help="also take untagged jobs")
    reg.add_argument("--description", default=f"snapfleet on {socket.gethostname()}")
    reg.add_argument("--locked", action="store_true", help="lock to the project")
    reg.add_argument("--paused", action="store_true", help="create it paused")
    reg.add_argument("--maximum-timeout", type=int, metavar="S", help="cap job timeouts")
    reg.add_argument("--token-file", type=Path, metavar="F",
                     help="file holding the access token (default: read it from stdin)")
    reg.add_argument("--output", type=Path, metavar="F",
                     help="where to store the runner token (default: the state dir)")
    for name, text in (("unregister", "delete the runner and its stored token"),
                       ("check", "verify the stored runner token with GitLab")):
        p = actions.add_parser(name, help=text)
        p.add_argument("--url", required=True)
        p.add_argument("--runner-token-file", type=Path, metavar="F",
                       help="the stored runner token (default: the only one for this URL)")
