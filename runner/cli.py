"""The ``snapfleet`` command line.

Exit codes of ``snapfleet run``: the command's own exit code; 124 when it
timed out; 128+N when a signal N killed it; 125 when Snapfleet itself failed
(bad config, missing image, VM died); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner import __version__
from runner.config import Profile, Settings, load_settings
from runner.errors import ConfigError, SnapfleetError
from runner.log import configure_logging

EXIT_TIMEOUT = 124
EXIT_SYSTEM = 125
EXIT_INTERRUPTED = 130


def _progress(message: str) -> None:
    print(f"snapfleet: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapfleet", description="Ephemeral CI jobs in microVMs.")
    p.add_argument("--version", action="version", version=f"snapfleet {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one command in a fresh microVM")
    run.add_argument("--profile", help="VM profile from the config (default: default_profile)")
    run.add_argument("--image", help="image recipe name or built image directory")
    run.add_argument("--vcpus", type=int)
    run.add_argument("--memory", type=int, metavar="MIB")
    run.add_argument("--timeout", type=float, metavar="S", help="kill the job after S seconds")
    run.add_argument("--env", action="append", default=[], metavar="K=V", help="job environment")
    run.add_argument("--workdir", metavar="DIR", help="working directory in the guest")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments")

    image = sub.add_parser("image", help="guest images").add_subparsers(
        dest="action", required=True
    )
    build = image.add_parser("build", help="build (or find cached) an image")
    build.add_argument("name", nargs="?", default="default")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")

    snap = sub.add_parser("snapshot", help="snapshots").add_subparsers(dest="action", required=True)
    create = snap.add_parser("create", help="boot a template and snapshot it")
    create.add_argument("--profile")
    create.add_argument("--force", action="store_true", help="recreate even if one exists")
    snap.add_parser("list", help="list stored snapshots")
    verify = snap.add_parser("verify", help="re-hash a profile's snapshot files")
    verify.add_argument("--profile")

    sub.add_parser("doctor", help="check this host")
    config = sub.add_parser("config", help="configuration").add_subparsers(
        dest="action", required=True
    )
    check = config.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``snapfleet`` command."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    handlers: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "run": _run,
        "image": _image,
        "snapshot": _snapshot,
        "doctor": _doctor,
        "config": _config,
    }
    try:
        return asyncio.run(_guarded(handlers[args.command](args)))
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
        return EXIT_SYSTEM


async def _guarded(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; SIGTERM cancels it like Ctrl-C so cleanup code runs."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _profile(settings: Settings, args: argparse.Namespace) -> Profile:
    profile = settings.profile(getattr(args, "profile", None))
    updates: dict[str, Any] = {}
    for arg, key in (
        ("image", "image"),
        ("vcpus", "vcpus"),
        ("memory", "memory_mib"),
        ("timeout", "timeout_s"),
    ):
        value = getattr(args, arg, None)
        if value is not None:
            updates[key] = value
    if not updates:
        return profile
    try:
        return Profile.model_validate({**profile.model_dump(), **updates})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(
            "--" + str(err["loc"][0]).replace("_mib", "").replace("_s", ""), err["msg"]
        ) from None


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--env", f"expected K=V, got {pair!r}")
        env[key] = value
    return env


async def _run(args: argparse.Namespace) -> int:
    from runner.engine import Command, Engine

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ConfigError("command", "nothing to run: give a command after --")
    settings = _settings(args)
    profile = _profile(settings, args)
    command = Command(argv=argv, env=_parse_env(args.env), cwd=args.workdir, timeout_s=args.timeout)
    async with Engine(settings) as engine:
        snapshot = await engine.snapshot(profile, _progress)
        result = await engine.run(
            snapshot, command, _write_output, profile_timeout=profile.timeout_s
        )
    if result.timed_out:
        timeout = command.timeout_s or profile.timeout_s
        print(f"snapfleet: job timed out after {timeout:g}s and was killed", file=sys.stderr)
        return EXIT_TIMEOUT
    if result.signal:
        print(f"snapfleet: job killed by signal {result.signal}", file=sys.stderr)
        return 128 + result.signal
    return result.exit_code if result.exit_code is not None else EXIT_SYSTEM


def _write_output(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


async def _image(args: argparse.Namespace) -> int:
    from runner.images import build_image

    settings = _settings(args)
    image = await build_image(
        args.name,
        cache_dir=settings.paths.cache_dir,
        recipes_dir=settings.paths.recipes_dir,
        progress=_progress,
        force=args.force,
    )
    print(f"{image.name} {image.digest} {image.path}")
    return 0


async def _snapshot(args: argparse.Namespace) -> int:
    from runner.engine import Engine

    settings = _settings(args)
    async with Engine(settings) as engine:
        if args.action == "list":
            for path in engine.snapshots.list():
                print(path)
            return 0
        profile = _profile(settings, args)
        if args.action == "verify":
            snapshot = await engine.snapshot(profile, _progress, create=False)
            await snapshot.verify()
            print(f"snapshot {snapshot.key}: all checksums match")
            return 0
        snapshot = await engine.snapshot(profile, _progress, force=args.force)
        print(f"{snapshot.key} {snapshot.path}")
    return 0


async def _doctor(args: argparse.Namespace) -> int:
    from runner.host import doctor

    settings = _settings(args)
    failed = 0
    for check in await doctor(settings):
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark}] {check.name:12} {check.detail}")
        failed += int(check.required and not check.ok)
    return 1 if failed else 0


async def _config(args: argparse.Namespace) -> int:
    load_settings(args.file)
    print(f"{args.file}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
