"""Idle clones on one host: how many fit, and what each one costs in host memory.

Restores idle clones of the default profile's snapshot until ``--clones`` are
alive or the host says no (memory below ``--reserve-mib``, or a restore refused:
out of memory, pids, EAGAIN), lets them settle, then reads each QEMU's PSS from
``/proc/<pid>/smaps_rollup``, where it went (guest RAM, TCG translation cache,
QEMU's heap, mapped files: from ``smaps``), the host's free memory before and
after, the clones' CPU while idle, and whether a job (``echo ok``) on the last
clone still runs. ``--ksm`` then turns KSM on for a while (only if the host has
it), measures again and puts KSM back as it was.

``--compare`` first measures candidate changes both ways, side by side in one
run: a few clones of each variant restored interleaved, settled and read
together. Their USS (private memory) is the fair figure: the PSS of a variant
with a snapshot of its own shares its file with fewer clones.

    .venv/bin/python -m bench.density [--clones 32] [--settle 20] [--compare] [--ksm] [--json]

``--json`` prints one object as the last line: ``{"alive": N,
"pss_mib_per_clone": x, "job_on_last_ok": true|false, ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench._stats import log
from runner import compose
from runner.agent.messages import Command
from runner.config import Settings, load_settings
from runner.engine import Engine
from runner.errors import SnapfleetError
from runner.snapshots import Snapshot, SnapshotStore
from runner.vm.backend import Machine, MachineSpec

Log = Callable[[str], None]
KSM = Path("/sys/kernel/mm/ksm")
CLK_TCK = 100  # USER_HZ, the unit of /proc/<pid>/stat times on Linux
PAGE_MIB = 4096 / 2**20
# Kernel arguments that keep an idle guest from waking (and so from dirtying pages
# and making TCG translate code): no soft-lockup watchdog timer, and no atime
# writes when a clone (its clock set forward) first reads a file of the template.
QUIET_CMDLINE = "nowatchdog rootflags=noatime"
# What a guest falls back to when its clocksource watchdog finds the TSC unstable.
JIFFIES_CMDLINE = "clocksource=refined-jiffies"


# ---- reading the host --------------------------------------------------------


def meminfo_mib() -> dict[str, float]:
    """MemFree and MemAvailable of the host, MiB."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name in ("MemFree", "MemAvailable"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def rollup_mib(pid: int) -> dict[str, float]:
    """PSS and USS (private clean + dirty) of one process, MiB."""
    kb: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Private_Clean", "Private_Dirty", "AnonHugePages"):
            kb[name] = int(rest.split()[0])
    return {
        "pss": kb["Pss"] / 1024,
        "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024,
        "thp": kb["AnonHugePages"] / 1024,
    }


def where_mib(pid: int, ram_file: Path) -> dict[str, float]:
    """PSS of one QEMU by where it lives: guest RAM, TCG code, heap, files."""
    parts = {"guest_ram": 0.0, "tcg": 0.0, "heap": 0.0, "files": 0.0}
    part = "heap"
    ram = str(ram_file)
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and len(head) >= 5 and head[0][0] in "0123456789abcdef":
            path = head[5] if len(head) > 5 else ""
            if path == ram:
                part = "guest_ram"
            elif not path and "x" in head[1]:
                part = "tcg"  # the translation cache: QEMU's only anonymous rwx mapping
            elif not path or path.startswith("["):
                part = "heap"
            else:
                part = "files"
        elif line.startswith("Pss:"):
            parts[part] += int(line.split()[1]) / 1024
    return parts


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---- clones ---------------------------------------------------------------


@dataclass
class Variant:
    """One way of making idle clones, and the clones made that way."""

    name: str
    engine: Engine
    snapshot: Snapshot
    machines: list[Machine] = field(default_factory=list)

    async def start(self) -> Machine:
        machine = await self.engine.restore(self.snapshot, use_pool=False)
        self.machines.append(machine)
        return machine

    def figures(self) -> dict[str, Any]:
        pids = [m.pid for m in self.machines if m.pid is not None]
        rolls = [rollup_mib(p) for p in pids]
        where = [where_mib(p, self.snapshot.memory) for p in pids]
        return {
            "clones": len(pids),
            "pss_mib": round(statistics.mean(r["pss"] for r in rolls), 1),
            "uss_mib": round(statistics.mean(r["uss"] for r in rolls), 1),
            "thp_mib": round(statistics.mean(r["thp"] for r in rolls), 1),
            "where_pss_mib": {
                k: round(statistics.mean(w[k] for w in where), 1) for k in where[0]
            },
        }

    async def destroy(self) -> None:
        for machine in self.machines:
            await machine.destroy()
        self.machines.clear()


async def start_until(variant: Variant, count: int, reserve_mib: int, log: Log) -> str | None:
    """Restore clones until ``count`` are alive; the reason it stopped early, if it did."""
    while len(variant.machines) < count:
        available = meminfo_mib()["MemAvailable"]
        if available < reserve_mib:
            return f"host memory available {available:.0f} MiB < reserve {reserve_mib} MiB"
        try:
            await variant.start()
        except SnapfleetError as exc:
            return f"restore {len(variant.machines) + 1} refused: {exc}"
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
                return f"restore {len(variant.machines) + 1}: {exc}"
            raise
        if len(variant.machines) % 8 == 0:
            log(f"{len(variant.machines)} clones alive")
    return None


async def job_ok(machine: Machine, timeout: float = 120.0) -> bool:
    """Does ``echo ok`` run on ``machine`` and print ok?"""
    try:
        async with asyncio.timeout(timeout):
            session = await machine.exec(Command(argv=["echo", "ok"]))
            output = b""
            async for chunk in session:
                output += chunk.data
            result = await session.wait()
    except (SnapfleetError, TimeoutError):
        return False
    return result.exit_code == 0 and output == b"ok\n"


CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


async def guest_output(machine: Machine, path: str, timeout: float = 60.0) -> str:
    """The contents of a file in the guest, stripped."""
    async with asyncio.timeout(timeout):
        session = await machine.exec(Command(argv=["cat", path]))
        output = b""
        async for chunk in session:
            output += chunk.data
        await session.wait()
    return output.decode(errors="replace").strip()


def idle_cpu_percent(machines: list[Machine]) -> Callable[[], float]:
    """Start measuring the clones' CPU; the returned call gives % of one core since."""
    pids = [m.pid for m in machines if m.pid is not None]
    before = sum(cpu_s(p) for p in pids)
    started = time.monotonic()

    def done() -> float:
        used = sum(cpu_s(p) for p in pids) - before
        return round(100 * used / max(time.monotonic() - started, 1e-3), 1)

    return done


# ---- KSM ------------------------------------------------------------------


def _ksm_read(name: str) -> int:
    return int((KSM / name).read_text().split()[0])


@contextlib.contextmanager
def ksm_on(pages_to_scan: int) -> Iterator[None]:
    """KSM running while inside; afterwards its settings are put back as they were
    (and, if it was off with nothing merged, everything it merged is unmerged)."""
    saved = {name: (KSM / name).read_text().strip() for name in ("run", "pages_to_scan")}
    was_idle = saved["run"] == "0" and _ksm_read("pages_sharing") == 0
    try:
        (KSM / "pages_to_scan").write_text(str(pages_to_scan))
        (KSM / "run").write_text("1")
        yield
    finally:
        if was_idle:
            (KSM / "run").write_text("2")  # unmerge what this bench merged
        for name in ("pages_to_scan", "run"):
            (KSM / name).write_text(saved[name])


async def ksm_phase(variant: Variant, scans: int, timeout: float, log: Log) -> dict[str, Any]:
    """PSS of the idle clones after ``scans`` full KSM scans, and what ksmd spent."""
    ksmd = next(
        (int(p.name) for p in Path("/proc").iterdir()
         if p.name.isdigit() and (p / "comm").read_text().strip() == "ksmd"),
        None,
    )
    with ksm_on(pages_to_scan=4000):
        cpu_before = cpu_s(ksmd) if ksmd else 0.0
        first = _ksm_read("full_scans")
        started = time.monotonic()
        for _ in range(int(timeout)):
            if _ksm_read("full_scans") >= first + scans:
                break
            await asyncio.sleep(1)
        elapsed = time.monotonic() - started
        figures = variant.figures()
        merged = {
            "pages_sharing_mib": round(_ksm_read("pages_sharing") * PAGE_MIB, 1),
            "pages_shared_mib": round(_ksm_read("pages_shared") * PAGE_MIB, 1),
        }
        ksmd_cpu = round(100 * ((cpu_s(ksmd) if ksmd else 0.0) - cpu_before) / elapsed, 1)
        scanned = _ksm_read("full_scans") - first
    log(f"ksm: {scanned} full scans in {elapsed:.0f}s; its settings put back")
    return {**figures, **merged, "ksmd_cpu_percent": ksmd_cpu, "scan_s": round(elapsed, 1),
            "full_scans": scanned}


# ---- variants for --compare -------------------------------------------------


def bench_settings(cache_dir: Path, state_dir: Path, **vm: Any) -> Settings:
    return load_settings(
        None,
        paths={"cache_dir": cache_dir, "state_dir": state_dir},
        net={"egress": "none", "dns": []},
        vm=vm,
    )


async def variant_snapshot(
    engine: Engine, store: SnapshotStore, cmdline_extra: str, before_save: list[str], log: Log
) -> Snapshot:
    """A snapshot of the default image made like the product's, with one change: extra
    kernel arguments, or another last command in the template before the save."""
    profile = engine.settings.profile()
    image = await engine.image(profile, log)
    spec: MachineSpec = engine.spec(profile, image)
    if cmdline_extra:
        spec = replace(spec, cmdline=f"{spec.cmdline} {cmdline_extra}")
    # The key names the image; a different last command must not share a key.
    digest = f"{image.digest}-{'-'.join(before_save).replace('/', '')}"
    found = store.find(digest, spec)
    if found is not None:
        return found

    async def template(spec: MachineSpec, disk: Path, memory: Path, state: Path) -> float:
        started = time.monotonic()
        machine = await engine.hypervisor.boot_template(spec, disk, memory)
        try:
            boot_s = time.monotonic() - started
            session = await machine.exec(Command(argv=before_save))
            await session.wait()
            await machine.save_snapshot(state)
        finally:
            await machine.destroy()
        return boot_s

    log(f"creating bench snapshot ({cmdline_extra or 'product cmdline'}, then {before_save})")
    return await store.create(template, digest, spec, image.rootfs, log)


@contextlib.asynccontextmanager
async def engines(
    cache_dir: Path, root: Path, compare: bool
) -> AsyncIterator[dict[str, Engine]]:
    """The product's engine, and with ``compare`` one with THP left on under TCG
    (another instance on its own state dir, as a second daemon would be)."""
    async with contextlib.AsyncExitStack() as stack:
        found = {
            "product": await stack.enter_async_context(
                compose.engine(bench_settings(cache_dir, root / "a"))
            )
        }
        if compare:
            found["thp"] = await stack.enter_async_context(
                compose.engine(bench_settings(cache_dir, root / "b", tcg_thp=True))
            )
        yield found


async def compare(
    found: dict[str, Engine], snapshot: Snapshot, args: argparse.Namespace, log: Log
) -> dict[str, Any]:
    """Each candidate both ways: ``args.per_variant`` clones each, interleaved."""
    product = found["product"]
    store = SnapshotStore(
        args.cache_dir / "bench-snapshots",
        product.vmm,
        qemu_img=product.settings.vm.qemu_img_binary,
    )
    variants = [
        Variant("product", product, snapshot),
        Variant("thp on (tcg_thp)", found["thp"], snapshot),
        Variant(
            "tb 32 MiB",
            product,
            replace(snapshot, spec=replace(snapshot.spec, tcg_tb_size_mib=32)),
        ),
        Variant(
            "template: true",
            product,
            await variant_snapshot(product, store, "", ["/bin/true"], log),
        ),
        Variant(
            "template: sync",
            product,
            await variant_snapshot(product, store, "", ["/bin/sync"], log),
        ),
        Variant(
            f"template: sync, {QUIET_CMDLINE}",
            product,
            await variant_snapshot(product, store, QUIET_CMDLINE, ["/bin/sync"], log),
        ),
        Variant(
            f"template: sync, {JIFFIES_CMDLINE}",
            product,
            await variant_snapshot(product, store, JIFFIES_CMDLINE, ["/bin/sync"], log),
        ),
    ]
    try:
        for i in range(args.per_variant):
            for variant in variants[i % len(variants):] + variants[: i % len(variants)]:
                await variant.start()
            log(f"compare: round {i + 1}/{args.per_variant} started")
        cpu = {v.name: idle_cpu_percent(v.machines) for v in variants}
        await asyncio.sleep(args.settle)
        figures = {
            v.name: {**v.figures(), "idle_cpu_percent_per_clone": round(
                cpu[v.name]() / max(len(v.machines), 1), 2)}
            for v in variants
        }
        for v in variants:
            figures[v.name]["clocksource"] = await guest_output(v.machines[0], CLOCKSOURCE)
        return figures
    finally:
        for variant in variants:
            await variant.destroy()


# ---- the run ----------------------------------------------------------------


async def bench(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sf-dn-", dir="/tmp"))
    try:
        async with engines(args.cache_dir, root, args.compare) as found:
            engine = found["product"]
            profile = engine.settings.profile()
            snapshot = await engine.snapshot(profile, log)
            result: dict[str, Any] = {
                "accel": engine.accel.accel,
                "qemu": engine.vmm.version,
                "memory_mib": profile.memory_mib,
                "tcg_tb_size_mib": snapshot.spec.tcg_tb_size_mib,
                "tcg_thp": engine.settings.vm.tcg_thp,
                "cmdline": snapshot.spec.cmdline,
            }
            if args.compare:
                result["variants"] = await compare(found, snapshot, args, log)
            result.update(await density(engine, snapshot, args, log))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


async def density(
    engine: Engine, snapshot: Snapshot, args: argparse.Namespace, log: Log
) -> dict[str, Any]:
    clones = Variant("idle", engine, snapshot)
    before = meminfo_mib()
    started = time.monotonic()
    try:
        stopped = await start_until(clones, args.clones, args.reserve_mib, log)
        start_s = time.monotonic() - started
        alive = len(clones.machines)
        why = f", stopped: {stopped}" if stopped else ""
        log(f"{alive} clones alive in {start_s:.0f}s{why}")
        if not alive:
            return {"alive": 0, "pss_mib_per_clone": None, "job_on_last_ok": False,
                    "stopped": stopped}
        cpu = idle_cpu_percent(clones.machines)
        await asyncio.sleep(args.settle)
        idle_cpu = cpu()
        figures = clones.figures()
        after = meminfo_mib()
        ok = await job_ok(clones.machines[-1])
        result: dict[str, Any] = {
            "alive": alive,
            "pss_mib_per_clone": figures["pss_mib"],
            "job_on_last_ok": ok,
            "target": args.clones,
            "stopped": stopped,
            "pss_mib_total": round(figures["pss_mib"] * alive, 1),
            "uss_mib_per_clone": figures["uss_mib"],
            "thp_mib_per_clone": figures["thp_mib"],
            "where_pss_mib_per_clone": figures["where_pss_mib"],
            "host_mib_before": before,
            "host_mib_after": after,
            "host_available_drop_mib_per_clone": round(
                (before["MemAvailable"] - after["MemAvailable"]) / alive, 1
            ),
            "idle_cpu_percent_of_one_core": idle_cpu,
            "settle_s": args.settle,
            "start_s": round(start_s, 1),
        }
        if args.ksm:
            if KSM.is_dir():
                result["ksm"] = await ksm_phase(clones, args.ksm_scans, args.ksm_timeout, log)
            else:
                result["ksm"] = "this host has no KSM"
        return result
    finally:
        await clones.destroy()


def print_table(result: dict[str, Any]) -> None:
    print(
        f"accel {result['accel']}, QEMU {result['qemu']}, {result['memory_mib']} MiB guest, "
        f"TCG cache {result['tcg_tb_size_mib']} MiB, THP under TCG {result['tcg_thp']}"
    )
    if "variants" in result:
        print(f"\n{'variant':44}{'n':>3}{'PSS':>7}{'USS':>7}{'THP':>6}"
              f"{'ram':>6}{'tcg':>6}{'heap':>6}{'files':>6}{'CPU%':>6}  clock  (MiB, % per clone)")
        for name, v in result["variants"].items():
            w = v["where_pss_mib"]
            print(f"{name:44}{v['clones']:>3}{v['pss_mib']:>7}{v['uss_mib']:>7}{v['thp_mib']:>6}"
                  f"{w['guest_ram']:>6}{w['tcg']:>6}{w['heap']:>6}{w['files']:>6}"
                  f"{v['idle_cpu_percent_per_clone']:>6}  {v['clocksource']}")
        print()
    print(f"alive clones         {result['alive']} of {result.get('target')}"
          + (f" (stopped: {result['stopped']})" if result.get("stopped") else ""))
    if not result["alive"]:
        return
    w = result["where_pss_mib_per_clone"]
    print(f"PSS per idle clone   {result['pss_mib_per_clone']} MiB "
          f"(USS {result['uss_mib_per_clone']}; guest RAM {w['guest_ram']:.1f}, "
          f"TCG {w['tcg']:.1f}, heap {w['heap']:.1f}, files {w['files']:.1f})")
    print(f"PSS total            {result['pss_mib_total']} MiB")
    b, a = result["host_mib_before"], result["host_mib_after"]
    print(f"host available       {b['MemAvailable']:.0f} -> {a['MemAvailable']:.0f} MiB "
          f"({result['host_available_drop_mib_per_clone']} MiB per clone); free "
          f"{b['MemFree']:.0f} -> {a['MemFree']:.0f} MiB")
    print(f"idle CPU             {result['idle_cpu_percent_of_one_core']}% of one core "
          f"(all clones, over {result['settle_s']:.0f}s)")
    print(f"job on last clone    {'ok' if result['job_on_last_ok'] else 'FAILED'}")
    ksm = result.get("ksm")
    if isinstance(ksm, dict):
        print(f"with KSM             PSS {ksm['pss_mib']} MiB per clone, USS {ksm['uss_mib']}; "
              f"sharing {ksm['pages_sharing_mib']} MiB; ksmd {ksm['ksmd_cpu_percent']}% CPU "
              f"over {ksm['scan_s']}s")
    elif ksm:
        print(f"KSM                  {ksm}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clones", type=int, default=32)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds the clones idle before they are measured")
    parser.add_argument("--reserve-mib", type=int, default=2048,
                        help="stop starting clones when the host has less available")
    parser.add_argument("--compare", action="store_true",
                        help="first measure the candidate changes both ways")
    parser.add_argument("--per-variant", type=int, default=4)
    parser.add_argument("--ksm", action="store_true",
                        help="then measure with KSM on (put back afterwards)")
    parser.add_argument("--ksm-scans", type=int, default=2)
    parser.add_argument("--ksm-timeout", type=float, default=180.0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/snapfleet"))
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()


    result = asyncio.run(bench(args, log))
    if args.json:
        head = {k: result[k] for k in ("alive", "pss_mib_per_clone", "job_on_last_ok")}
        print(json.dumps({**head, **{k: v for k, v in result.items() if k not in head}}))
        return
    print_table(result)


if __name__ == "__main__":
    main()
