"""``snapfleet cache gc``: remove superseded images, layers and snapshots."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from runner import cache_gc
from runner.config import Settings, load_settings
from runner.errors import ConfigError, SnapfleetError
from runner.snapshots import Vmm, snapshot_key


async def cache(args: argparse.Namespace) -> int:
    """``cache gc``: print what goes (or would, with ``--dry-run``) and the total; exit 0."""
    if args.keep_days < 0:
        raise ConfigError("--keep-days", "must be 0 or more")
    settings = load_settings(args.config)
    cache_dir: Path = args.cache_dir or settings.paths.cache_dir
    if not cache_dir.is_dir():
        raise ConfigError("--cache-dir", f"{cache_dir} is not a directory")
    paths = settings.paths.model_copy(update={"cache_dir": cache_dir})
    settings = settings.model_copy(update={"paths": paths})

    current, problems = await current_roots(settings)
    entries, unreadable = await asyncio.to_thread(cache_gc.scan, cache_dir)
    using = await asyncio.to_thread(cache_gc.processes_using, cache_dir)
    now = time.time()
    verdicts = cache_gc.plan(entries, current, using, now=now,
                             keep_s=args.keep_days * cache_gc.DAY_S)
    for problem in [*problems, *unreadable]:
        print(f"snapfleet: warning: {problem}", file=sys.stderr)
    doomed = [v.entry for v in verdicts if v.keep is None]
    verb = "would remove" if args.dry_run else "removed"

    def report(entry: cache_gc.Entry) -> None:
        print(f"{verb} {entry.name}  {human(entry.size)}  ({why(entry, now)})", flush=True)

    if args.dry_run:
        for entry in doomed:
            report(entry)
        removed, reclaimed = len(doomed), cache_gc.freed(doomed)
    else:
        outcome = await asyncio.to_thread(cache_gc.remove, cache_dir, doomed, report)
        for entry in outcome.held:
            print(f"kept {entry.name}: a build holds it")
        for entry, error in outcome.failed:
            print(f"snapfleet: cannot remove {entry.name}: {error}", file=sys.stderr)
        removed, reclaimed = len(outcome.removed), outcome.reclaimed
    kept: dict[str, int] = {}
    for v in verdicts:
        if v.keep is not None:
            kept[v.keep.value] = kept.get(v.keep.value, 0) + 1
    detail = ", ".join(f"{n} {reason}" for reason, n in sorted(kept.items()))
    print(f"{'would reclaim' if args.dry_run else 'reclaimed'} {human(reclaimed)} from "
          f"{removed} entries in {cache_dir}; kept {sum(kept.values())}"
          + (f" ({detail})" if detail else ""))
    return 0


async def current_roots(settings: Settings) -> tuple[set[str], list[str]]:
    """Entry names the config's profiles resolve to now, and what could not be resolved.

    Per profile: its recipe's layers, image and downloads, and the snapshot the
    engine would restore it from (the same key `Engine.snapshot` finds).
    """
    from runner import compose

    paths = settings.paths
    engine = compose.engine(settings)  # not entered: nothing is built or changed
    hv = engine.hypervisor
    vmm = Vmm(hv.name, await hv.version(), hv.device_layout)
    names: set[str] = set()
    problems: list[str] = []
    for name, profile in sorted(settings.profiles.items()):
        own = Path(profile.image)
        if profile.rootfs is None and not (own.is_absolute() or own.is_dir()):
            try:
                found, trouble = await asyncio.to_thread(
                    cache_gc.recipe_roots, profile.image, cache_dir=paths.cache_dir,
                    recipes_dir=paths.recipes_dir, environ=os.environ,
                )
            except SnapfleetError as exc:
                problems.append(f"profile {name}: {exc}")
            else:
                names |= found
                problems += [f"profile {name}: {t}" for t in trouble]
        try:
            image = await engine.image(profile, _quiet, build=False)
        except SnapfleetError as exc:
            problems.append(f"profile {name} has no current snapshot: {exc}")
            continue
        key = snapshot_key(image.digest, engine.spec(profile, image), vmm)
        names.add(cache_gc.snapshot_root(paths.cache_dir, key))
    return names, problems


def _quiet(_message: str) -> None:
    pass


def why(entry: cache_gc.Entry, now: float) -> str:
    if entry.kind is cache_gc.Kind.TEMP:
        return f"left by build process {entry.owner_pid}, which is gone"
    days = (now - entry.used_at) / cache_gc.DAY_S
    return f"superseded {entry.kind.value}, last used {days:.1f} days ago"


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
