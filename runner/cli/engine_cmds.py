"""Commands that use the engine directly: run, image, snapshot, doctor, config."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pydantic import ValidationError

from runner.cli.args import parse_env
from runner.config import Profile, Settings, load_settings
from runner.errors import ConfigError
from runner.host import Check
from runner.service.jobs import parse_submission


def progress(message: str) -> None:
    print(f"snapfleet: {message}", file=sys.stderr, flush=True)


def settings_of(args: argparse.Namespace) -> Settings:
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


async def run(args: argparse.Namespace) -> int:
    from runner import compose
    from runner.execution import Command, command_work, exit_code
    from runner.execution import run as run_job
    from runner.service.jobs import JobState

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ConfigError("command", "nothing to run: give a command after --")
    settings = settings_of(args)
    profile = _profile(settings, args)
    plain, secret = parse_env(args.env)
    spec, secret_env = parse_submission(
        {"command": argv, "env": plain, "secret_env": secret, "workdir": args.workdir,
         "timeout_s": args.timeout}
    )
    env = {**spec.env, **{k: v.reveal() for k, v in secret_env.items()}}
    command = Command(argv=spec.command, env=env, cwd=spec.workdir)
    timeout = spec.timeout_s or profile.timeout_s
    async with compose.engine(settings) as engine:
        report = await run_job(
            engine, profile, command_work(command, _write_output, timeout),
            timeout_s=timeout, note=progress,
        )
    outcome = report.outcome
    if outcome.state is JobState.TIMED_OUT:
        print(f"snapfleet: job timed out after {timeout:g}s and was killed", file=sys.stderr)
    elif outcome.signal:
        print(f"snapfleet: job killed by signal {outcome.signal}", file=sys.stderr)
    elif outcome.state is JobState.SYSTEM_FAILURE:
        print(f"snapfleet: {outcome.reason}", file=sys.stderr)
    return exit_code(outcome)


def _write_output(stream: str, data: bytes) -> None:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


async def image(args: argparse.Namespace) -> int:
    from runner.images import build_image

    settings = settings_of(args)
    image = await build_image(
        args.name,
        cache_dir=settings.paths.cache_dir,
        recipes_dir=settings.paths.recipes_dir,
        progress=progress,
        force=args.force,
    )
    print(f"{image.name} {image.digest} {image.path}")
    return 0


async def snapshot(args: argparse.Namespace) -> int:
    from runner import compose

    settings = settings_of(args)
    async with compose.engine(settings) as engine:
        if args.action == "list":
            for path in engine.snapshots.list():
                print(path)
            return 0
        profile = _profile(settings, args)
        if args.action == "verify":
            snapshot = await engine.snapshot(profile, progress, create=False)
            await snapshot.verify()
            print(f"snapshot {snapshot.key}: all checksums match")
            return 0
        snapshot = await engine.snapshot(profile, progress, force=args.force)
        print(f"{snapshot.key} {snapshot.path}")
    return 0


async def doctor(args: argparse.Namespace) -> int:
    from runner.host import doctor

    settings = settings_of(args)
    failed = 0
    checks = await doctor(settings)
    if args.boot and all(c.ok for c in checks if c.required):
        checks.append(await _boot_check(settings))
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"[{mark}] {check.name:12} {check.detail}")
        failed += int(check.required and not check.ok)
    if args.net:
        await _show_net(settings)
    return 1 if failed else 0


async def _show_net(settings: Settings) -> None:
    """Each profile's policy, and the nft rules this instance installs (or has installed)."""
    from ipaddress import IPv4Address

    from runner import compose
    from runner.errors import NetworkError
    from runner.net import nft

    engine = compose.engine(settings)  # not entered: nothing is built or changed
    if engine.net is None:
        print("\nnetworking is off (net.enabled = false): guests have no network")
        return
    config = engine.net.config
    resolvers = ", ".join(map(str, engine.resolvers.nameservers)) or "none"
    print(f"\ninstance {config.instance} (state dir {settings.paths.state_dir})")
    print(f"guest resolvers: {resolvers} (from {engine.resolvers.source})")
    for why in engine.resolvers.skipped:
        print(f"  skipped {why}")
    ports = ", ".join(map(str, config.allow_host_ports)) or "none"
    print(f"host ports offered to guests (at their gateway {config.tap_address.ip}): {ports}")
    for name, profile in settings.profiles.items():
        policy = engine.policy(profile)
        allow = ", ".join(
            f"{a.cidr}" + (f" ports {','.join(map(str, a.ports))}" if a.ports else "")
            for a in policy.allow
        ) or "nothing extra"
        print(f"profile {name}: egress {policy.egress}; allow {allow}")
        example = nft.ns_policy(config, policy, IPv4Address(config.slot_addresses(0)[0].ip))
        print("  " + example.strip().replace("\n", "\n  "))
    try:
        print(f"\nhost table (installed):\n{await engine.net.host_rules()}")
    except NetworkError:
        print(f"\nhost table (not installed yet; what `serve`/`run` install):\n"
              f"{nft.host_ruleset(config)}")


async def _boot_check(settings: Settings) -> Check:
    """Cold-boot the default profile's (cached) image with the chosen accelerator."""
    from runner import compose
    from runner.errors import SnapfleetError

    profile = settings.profile()
    # A check must not change the host: boot without networking (no NAT, no ip_forward).
    quiet = settings.model_copy(update={"net": settings.net.model_copy(update={"enabled": False})})
    try:
        async with compose.engine(quiet) as engine:
            image = await engine.image(profile, progress, build=False)
            started = time.monotonic()
            machine = await engine.hypervisor.boot(engine.spec(profile, image), image.rootfs)
            seconds = time.monotonic() - started
            await machine.destroy()
    except SnapfleetError as exc:
        return Check("boot", False, f"cold boot failed: {exc}")
    return Check("boot", True, f"{engine.accel.accel}: image booted to its agent in {seconds:.1f}s")


async def config(args: argparse.Namespace) -> int:
    load_settings(args.file)
    print(f"{args.file}: ok")
    return 0
