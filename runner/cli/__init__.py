"""The ``snapfleet`` command line.

Exit codes of ``snapfleet run`` (and ``submit --follow``): the command's own exit code; 124 when it
timed out; 128+N when a signal N killed it; 125 when Snapfleet itself failed
(bad config, missing image, VM died); 130 when interrupted.

A command's module is imported when that command runs, not before: the clients of
the daemon (`submit`, the GitLab executor's steps...) are short-lived processes
whose start-up time is most of their cost (see `runner.cli.client_cmds`).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any

from runner import __version__
from runner.cli import gitlab_args
from runner.error_root import ConfigError, SnapfleetError

EXIT_SYSTEM = 125
"""`runner.execution.EXIT_SYSTEM` (a test holds them equal); importing that module
costs structlog, which the clients of the daemon never use."""
EXIT_INTERRUPTED = 130

# command → (module under runner.cli, function); `client_cmds` functions are plain,
# the others are coroutines run on an event loop.
COMMANDS = {
    "run": ("engine_cmds", "run"),
    "image": ("engine_cmds", "image"),
    "snapshot": ("engine_cmds", "snapshot"),
    "doctor": ("engine_cmds", "doctor"),
    "config": ("engine_cmds", "config"),
    "cache": ("cache_cmds", "cache"),
    "serve": ("daemon_cmds", "serve"),
    "submit": ("client_cmds", "submit"),
    "jobs": ("client_cmds", "jobs"),
    "logs": ("client_cmds", "logs"),
    "cancel": ("client_cmds", "cancel"),
    "status": ("client_cmds", "status"),
    "gitlab-executor": ("client_cmds", "gitlab_executor"),
    "gitlab": ("gitlab_cmds", "main"),
    "github": ("github_cmds", "github"),
}


class _Commands:
    """Subcommands that also accept the global options after their name."""

    def __init__(self, group: Any, common: argparse.ArgumentParser) -> None:
        self._group = group
        self._common = common

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._group.add_parser(
            name, parents=[self._common], **kw
        )
        return parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfleet", description="Ephemeral CI jobs in microVMs.")
    p.add_argument("--version", action="version", version=f"snapfleet {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    # The same options after the command (`snapfleet serve --config F`); SUPPRESS keeps
    # a value given before the command when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def commands(parser: argparse.ArgumentParser, dest: str) -> _Commands:
        return _Commands(parser.add_subparsers(dest=dest, required=True), common)

    sub = commands(p, "command")

    run = sub.add_parser("run", help="run one command in a fresh microVM")
    run.add_argument("--profile", help="VM profile from the config (default: default_profile)")
    run.add_argument("--image", help="image recipe name or built image directory")
    run.add_argument("--vcpus", type=int)
    run.add_argument("--memory", type=int, metavar="MIB")
    run.add_argument("--timeout", type=float, metavar="S", help="kill the job after S seconds")
    run.add_argument(
        "--env", action="append", default=[], metavar="K=V",
        help="job environment; K alone passes your own $K (keeps secrets out of ps)",
    )
    run.add_argument("--workdir", metavar="DIR", help="working directory in the guest")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments")

    image = commands(sub.add_parser("image", help="guest images"), "action")
    build = image.add_parser("build", help="build (or find cached) an image")
    build.add_argument("name", nargs="?", default="default")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")

    snap = commands(sub.add_parser("snapshot", help="snapshots"), "action")
    create = snap.add_parser("create", help="boot a template and snapshot it")
    create.add_argument("--profile")
    create.add_argument("--force", action="store_true", help="recreate even if one exists")
    snap.add_parser("list", help="list stored snapshots")
    verify = snap.add_parser("verify", help="re-hash a profile's snapshot files")
    verify.add_argument("--profile")

    cache = commands(sub.add_parser("cache", help="the image and snapshot cache"), "action")
    gc = cache.add_parser(
        "gc", help="remove images, layers and snapshots the config no longer uses"
    )
    gc.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    gc.add_argument("--keep-days", type=float, default=7.0, metavar="N",
                    help="also keep whatever was used in the last N days (default 7)")
    gc.add_argument("--cache-dir", type=Path, metavar="DIR",
                    help="the cache to clean (default: paths.cache_dir)")

    sub.add_parser("serve", help="run the fleet daemon (systemd runs this)")
    submit = sub.add_parser("submit", help="queue a job with the daemon")
    submit.add_argument("file", nargs="?", default="-", help="job spec (TOML or JSON); - = stdin")
    submit.add_argument("-f", "--follow", action="store_true",
                        help="stream the job's log and exit with its exit code")
    submit.add_argument(
        "--env", action="append", default=[], metavar="K=V",
        help="job environment; K alone passes your own $K as a secret: kept out of ps, the"
             " daemon's database and logs (a daemon restart before the job starts ends it)",
    )
    jobs = sub.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--limit", type=int, default=50)
    logs = sub.add_parser("logs", help="print a job's log")
    logs.add_argument("job")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until it ends")
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job")
    sub.add_parser("status", help="capacity, running and queued jobs")

    gitlab_args.add_parser(sub)
    gitlab = sub.add_parser("gitlab-executor", help="gitlab-runner custom executor steps")
    gitlab.add_argument("action", choices=["config", "prepare", "run", "cleanup"])
    gitlab.add_argument("args", nargs=argparse.REMAINDER, help="run: <script> <stage>")

    doctor = sub.add_parser("doctor", help="check this host")
    doctor.add_argument("--boot", action="store_true",
                        help="also cold-boot the default image to prove the accelerator works")
    doctor.add_argument("--net", action="store_true",
                        help="show each profile's network policy and this instance's nft rules")
    gh = commands(sub.add_parser("github", help="GitHub Actions"), "action")
    gh_check = gh.add_parser("check", help="check credentials, permissions, runner group and"
                                           " webhook or scale sets; print each fix")
    gh_check.add_argument("--webhook-url", help="the public webhook URL (default:"
                                                " github.webhook_url)")
    config = commands(sub.add_parser("config", help="configuration"), "action")
    check = config.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snapfleet`` command."""
    args = _parser().parse_args(argv)
    module, name = COMMANDS[args.command]
    handler = getattr(importlib.import_module(f"runner.cli.{module}"), name)
    try:
        if module == "client_cmds":
            previous = signal.signal(signal.SIGTERM, _interrupt)
            try:
                code: int = handler(args)
            finally:
                signal.signal(signal.SIGTERM, previous)
            return code
        from runner.log import configure_logging

        configure_logging(args.log_level)
        return _run_async(handler(args))
    except KeyboardInterrupt:
        print("snapfleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        for key, reason in exc.problems:
            print(
                f"snapfleet: config error: {key}: {reason}" if key else f"snapfleet: {reason}",
                file=sys.stderr,
            )
        return EXIT_SYSTEM
    except SnapfleetError as exc:
        print(f"snapfleet: error: {exc}", file=sys.stderr)
        console = getattr(exc, "console", None)  # a GuestEnded's last console lines
        if console:
            print(f"the guest's last console lines:\n{console}", file=sys.stderr)
        return EXIT_SYSTEM


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops a client command like Ctrl-C."""
    raise KeyboardInterrupt


def _run_async(work: Coroutine[Any, Any, int]) -> int:
    import asyncio

    async def guarded() -> int:
        # SIGTERM cancels the work like Ctrl-C so cleanup code runs.
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())
