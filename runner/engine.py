"""The engine: from a profile to a clean VM running one command, then nothing.

It ties images, snapshots, the hypervisor and networking together for one
host. ``snapfleet run`` uses it directly; the daemon schedules onto it.
"""

from __future__ import annotations

import asyncio
import hashlib
import pwd
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from runner.config import Profile, Settings
from runner.errors import AgentError, ConfigError, ImageError, RestoreError, SnapshotError, VMError
from runner.host import AccelChoice, host_tsc_khz, qemu_version, resolve_accel
from runner.images import Image, build_image, find_image, load_image_dir
from runner.net import NetConfig, NetworkManager
from runner.net.config import instance_id
from runner.net.dns import Resolvers, host_resolvers
from runner.net.policy import EgressPolicy
from runner.pool import WarmPool
from runner.snapshots import Snapshot, SnapshotStore
from runner.vm.backend import MachineSpec, TeardownReport
from runner.vm.qemu import QemuHypervisor, QemuMachine

log = structlog.get_logger("snapfleet.engine")

Progress = Callable[[str], None]
OutputSink = Callable[[str, bytes], Awaitable[None] | None]
TIMEOUT_GRACE_S = 10.0


@dataclass(frozen=True)
class Command:
    """What to run in the guest: an argv, or a script for ``/bin/sh``."""

    argv: Sequence[str] | None = None
    script: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_s: float | None = None


@dataclass
class RunResult:
    """How a command ended, and what it cost."""

    vm_id: str
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    restore_s: float = 0.0
    run_s: float = 0.0
    teardown: TeardownReport | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class Engine:
    """Images, snapshots and VMs on one host. Use ``async with``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.accel: AccelChoice = resolve_accel(settings.vm.accel)
        self.instance = instance_id(settings.paths.state_dir)
        self.net: NetworkManager | None = None
        self.resolvers = Resolvers(tuple(settings.net.dns or ()), "config")
        if settings.net.enabled:
            if settings.net.dns is None:
                self.resolvers = host_resolvers()
            self.net = NetworkManager(
                NetConfig(
                    instance=self.instance,
                    pool=settings.net.host_pool,
                    nameservers=self.resolvers.nameservers,
                    allow_host_ports=tuple(sorted(set(settings.net.allow_host_ports))),
                )
            )
        _check_run_as(settings.vm.run_as)
        self.hypervisor = QemuHypervisor(
            settings.vm, settings.paths.state_dir / "vms", self.net, instance=self.instance
        )
        # One refill at a time: on a small host, spawning QEMU competes with running jobs.
        self.pool = WarmPool(self.hypervisor, max_refills=1)
        self.qemu_version = ""
        self._snapshot_lock = asyncio.Lock()
        self._resolved: dict[str, Snapshot] = {}  # by profile
        # Read once: under TCG every guest is told the host's TSC frequency.
        self._tsc_khz = host_tsc_khz() if self.accel.accel == "tcg" else None

    async def __aenter__(self) -> Engine:
        self.qemu_version = await qemu_version(self.settings.vm.qemu_binary)
        if self.net is not None:
            for why in self.resolvers.skipped:
                log.warning("guest_resolver_skipped", source=self.resolvers.source, reason=why)
            if not self.resolvers.nameservers:
                log.warning(
                    "guests_have_no_dns",
                    hint="set net.dns to resolvers the guests can reach",
                    source=self.resolvers.source,
                )
            await self.net.setup_host()
        await self.pool.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The host table stays: other processes of this instance (a daemon beside
        # `snapfleet run` on one state dir) use it, and it matches only our veths.
        # ip_forward went back when the last clone was destroyed.
        await self.pool.close()

    def policy(self, profile: Profile) -> EgressPolicy:
        """The network policy for clones of ``profile``."""
        return profile.policy(self.settings.net)

    @property
    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(
            self.settings.paths.cache_dir / "snapshots",
            self.qemu_version,
            qemu_img=self.settings.vm.qemu_img_binary,
        )

    async def image(self, profile: Profile, progress: Progress, *, build: bool = True) -> Image:
        """The profile's image: a user-supplied one, a cached build, or a fresh build."""
        if profile.rootfs is not None:
            return _own_image(profile)
        candidate = Path(profile.image)
        if candidate.is_absolute() or candidate.is_dir():
            return load_image_dir(candidate)
        paths = self.settings.paths
        # A recipe with archives hashes them to find its key: keep that off the loop.
        found = await asyncio.to_thread(
            find_image, profile.image, cache_dir=paths.cache_dir, recipes_dir=paths.recipes_dir
        )
        if found is not None:
            return found
        if not build:
            raise ImageError(f"image {profile.image!r} is not built; run `snapfleet image build`")
        progress(f"building image {profile.image!r} (first run; cached afterwards)")
        return await build_image(
            profile.image,
            cache_dir=paths.cache_dir,
            recipes_dir=paths.recipes_dir,
            progress=progress,
        )

    def spec(self, profile: Profile, image: Image) -> MachineSpec:
        cmdline = image.cmdline
        if self.accel.accel == "tcg" and self._tsc_khz is not None:
            cmdline += f" tsc_early_khz={self._tsc_khz}"
        if self.net is not None:
            cmdline += " " + self.net.config.guest_kernel_args()
        return MachineSpec(
            vcpus=profile.vcpus,
            memory_mib=profile.memory_mib,
            kernel=image.kernel,
            initramfs=image.initramfs,
            cmdline=cmdline,
            accel=self.accel.accel,
            cpu=self.accel.cpu,
            network=self.net is not None,
            tcg_tb_size_mib=self.settings.vm.tcg_tb_size_mib if self.accel.accel == "tcg" else 0,
        )

    async def snapshot(
        self, profile: Profile, progress: Progress, *, create: bool = True, force: bool = False
    ) -> Snapshot:
        """The profile's snapshot, created (image first, if needed) when missing.

        Resolved once per profile and remembered: every job asks, and finding it
        means hashing the recipe's inputs.
        """
        key = profile.model_dump_json()
        known = self._resolved.get(key)
        if known is not None and not force and (known.path / "manifest.json").exists():
            return known
        found = await self._find_or_create(profile, progress, create=create, force=force)
        self._resolved[key] = found
        return found

    async def _find_or_create(
        self, profile: Profile, progress: Progress, *, create: bool, force: bool
    ) -> Snapshot:
        image = await self.image(profile, progress, build=create)
        spec = self.spec(profile, image)
        async with self._snapshot_lock:
            found = None if force else self.snapshots.find(image.digest, spec)
            if found is not None:
                return found
            if not create:
                raise SnapshotError("no snapshot for this profile; run `snapfleet snapshot create`")
            progress(
                f"creating snapshot of image {image.name} ({profile.vcpus} vCPU, "
                f"{profile.memory_mib} MiB)"
            )
            return await self.snapshots.create(
                self._template, image.digest, spec, image.rootfs, progress
            )

    async def _template(self, spec: MachineSpec, disk: Path, memory: Path, state: Path) -> float:
        # Local import: this method's edit stays self-contained (hoist it when convenient).
        from runner.images import WARMUP_GUEST_PATH as warmup_path

        started = time.monotonic()
        machine = await self.hypervisor.boot_template(spec, disk, memory)
        try:
            boot_s = time.monotonic() - started
            # The image's warm-up (its recipe's ``warmup``, installed in the guest
            # by the image builder) runs before the save, so what it did (files
            # read into the page cache) is done in every clone.
            timeout = self.settings.vm.boot_timeout_s
            output = b""
            try:
                async with asyncio.timeout(timeout + TIMEOUT_GRACE_S):
                    warmup = await machine.exec(
                        script=f"[ ! -e {warmup_path} ] || exec /bin/sh {warmup_path}",
                        timeout=timeout,
                    )
                    async for chunk in warmup:
                        output = (output + chunk.data)[-2000:]
                    status = await warmup.wait()
            except TimeoutError:
                raise SnapshotError(f"the image's warm-up {warmup_path} hung") from None
            if status.exit_code != 0:
                how = (
                    f"timed out after {timeout:.0f}s"
                    if status.timed_out
                    else f"exit {status.exit_code}, signal {status.signal}"
                )
                detail = output.decode(errors="replace").strip() or "no output"
                raise SnapshotError(f"the image's warm-up {warmup_path} failed ({how}): {detail}")
            # Run one command so the exec path is already warm in every clone.
            session = await machine.exec(["/bin/true"])
            await session.wait()
            await machine.save_snapshot(state)
        finally:
            await machine.destroy()
        return boot_s

    async def restore(
        self,
        snapshot: Snapshot,
        *,
        env: Mapping[str, str] | None = None,
        use_pool: bool = True,
        policy: EgressPolicy | None = None,
    ) -> QemuMachine:
        """A READY clone of ``snapshot``: from the warm pool when it has one, else fresh.

        ``timings["pool"]`` is 1.0 for a pooled machine (whose setup and spawn
        were paid before the job and are left out of its timings), else 0.0.
        """
        started = time.monotonic()
        machine = self.pool.acquire(snapshot) if use_pool else None
        if machine is not None:
            machine.timings.pop("setup", None)
            machine.timings.pop("spawn", None)
            try:
                await self.hypervisor.resume(machine, snapshot, env=env, policy=policy)
            except RestoreError as exc:
                # Its QEMU may have died while idle, after acquire() looked. resume()
                # has destroyed it already (destroy is idempotent); try once afresh.
                await machine.destroy()
                log.warning("pooled machine failed to resume", vm_id=machine.vm_id, error=str(exc))
                machine = None
        if machine is None:
            machine = await self.hypervisor.prepare(snapshot)
            await self.hypervisor.resume(machine, snapshot, env=env, policy=policy)
            machine.timings["pool"] = 0.0
        else:
            machine.timings["pool"] = 1.0
        machine.timings["total"] = time.monotonic() - started
        return machine

    def warm(self, name: str, profile: Profile, snapshot: Snapshot) -> None:
        """Keep ``profile.warm`` machines prepared for ``snapshot`` on behalf of profile ``name``.

        Calling it again with a new snapshot for the same name drops the old one's machines.
        """
        self.pool.set_target(snapshot, profile.warm, slot=name)

    async def run(
        self,
        snapshot: Snapshot,
        command: Command,
        sink: OutputSink,
        *,
        profile_timeout: float,
        policy: EgressPolicy | None = None,
    ) -> RunResult:
        """Restore a clone, run ``command`` streaming its output to ``sink``, destroy the clone."""
        started = time.monotonic()
        machine = await self.restore(snapshot, policy=policy)
        bound = log.bind(vm_id=machine.vm_id)
        result = RunResult(
            vm_id=machine.vm_id, exit_code=None, restore_s=time.monotonic() - started
        )
        timeout = command.timeout_s or profile_timeout
        try:
            await self.execute(machine, command, sink, timeout, result)
        finally:
            result.teardown = await machine.destroy()
            for problem in result.teardown.errors:
                bound.warning("teardown", problem=problem)
        bound.info(
            "job finished",
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            restore_ms=round(result.restore_s * 1000, 1),
            run_ms=round(result.run_s * 1000, 1),
            teardown=result.teardown.escalation,
        )
        return result

    async def execute(
        self,
        machine: QemuMachine,
        command: Command,
        sink: OutputSink,
        timeout: float,
        result: RunResult,
    ) -> None:
        """Run ``command`` in a READY machine, streaming to ``sink``, filling in ``result``.

        A dead VMM becomes VMDied; a hung guest past ``timeout`` is reported timed out.
        """
        started = time.monotonic()
        try:
            # The agent enforces the timeout in the guest; this backstop covers a hung guest.
            async with asyncio.timeout(timeout + TIMEOUT_GRACE_S):
                session = await machine.exec(
                    command.argv,
                    script=command.script,
                    env=command.env,
                    cwd=command.cwd,
                    timeout=timeout,
                )
                async for chunk in session:
                    out = sink(chunk.stream, chunk.data)
                    if out is not None:
                        await out
                status = await session.wait()
        except TimeoutError:
            result.timed_out = True
            result.run_s = time.monotonic() - started
            return
        except AgentError as exc:
            raise await machine.died_error(exc) from exc
        result.run_s = time.monotonic() - started
        result.exit_code = status.exit_code
        result.signal = status.signal
        result.timed_out = status.timed_out
        result.cancelled = status.cancelled


def _check_run_as(user: str | None) -> None:
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            "vm.run_as",
            f"user {user!r} does not exist: create it (scripts/install.sh does: "
            f"useradd --system {user}) or set vm.run_as",
        ) from None


def _own_image(profile: Profile) -> Image:
    """An image made of the user's own kernel, initramfs and rootfs."""
    if profile.kernel is None or profile.initramfs is None or profile.rootfs is None:
        raise ImageError("a profile's own image needs kernel, initramfs and rootfs")
    parts = [profile.kernel, profile.initramfs, profile.rootfs]
    for part in parts:
        if not part.exists():
            raise ImageError(f"profile names {part}, which does not exist")
    ident = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)
    return Image(
        name="custom",
        digest=hashlib.sha256(ident.encode()).hexdigest()[:20],
        path=profile.rootfs.parent,
        kernel=profile.kernel,
        initramfs=profile.initramfs,
        rootfs=profile.rootfs,
        cmdline="console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/snapfleet-init panic=-1",
        manifest={},
    )


__all__ = ["Command", "Engine", "RunResult", "VMError"]
