"""The engine: from a profile to a clean, READY VM.

It ties images, snapshots, the warm pool and the hypervisor it is given (by
the composition root, `runner.compose`) together for one host. Running work
in a VM goes through `runner.execution.run`, the one run path.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from runner.agent.messages import Command
from runner.config import Profile, Settings
from runner.errors import ImageError, RestoreError, SnapshotError
from runner.host import AccelChoice, host_tsc_khz, resolve_accel
from runner.hotpool import HotPool
from runner.images import WARMUP_GUEST_PATH, Image, build_image, find_image, load_image_dir
from runner.images.recipe import DEFAULT_CMDLINE
from runner.net.dns import Resolvers
from runner.net.policy import EgressPolicy
from runner.pool import WarmPool
from runner.snapshots import Snapshot, SnapshotStore, Vmm
from runner.vm.backend import Devices, Hypervisor, Machine, MachineSpec
from runner.vm.ownership import InstanceUse, vms_left

if TYPE_CHECKING:
    from runner.gpu import GpuAllocator

log = structlog.get_logger("snapfleet.engine")

Progress = Callable[[str], None]
TIMEOUT_GRACE_S = 10.0


class Engine:
    """Images, snapshots and VMs on one host. Use ``async with``."""

    def __init__(self, settings: Settings, hypervisor: Hypervisor, resolvers: Resolvers,
                 *, gpus: GpuAllocator | None = None) -> None:
        self.settings = settings
        self.gpus = gpus
        """The host's GPU allocator, when `[gpu]` hands out devices."""
        self.accel: AccelChoice = resolve_accel(settings.vm.accel)
        self.hypervisor = hypervisor
        self.instance = hypervisor.instance
        self.net = hypervisor.net_manager
        self.resolvers = resolvers
        # One refill at a time: on a small host, spawning a VMM competes with running jobs.
        self.pool = WarmPool(self.hypervisor, max_refills=1)
        self._restoring = 0  # jobs' restores under way: the hot pool waits for them
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.hot = HotPool(self.hypervisor, quiet=self._quiet.wait,
                           max_age_s=settings.vm.hot_max_age_s)
        self.vmm = Vmm(hypervisor.name, "", hypervisor.device_layout)
        self._snapshot_lock = asyncio.Lock()
        self._instance_use = InstanceUse(settings.paths.state_dir)
        self._resolved: dict[str, Snapshot] = {}  # by profile
        # Read once: under TCG every guest is told the host's TSC frequency.
        self._tsc_khz = host_tsc_khz() if self.accel.accel == "tcg" else None

    async def __aenter__(self) -> Engine:
        self.vmm = Vmm(self.hypervisor.name, await self.hypervisor.version(),
                       self.hypervisor.device_layout)
        if self.net is not None:
            for why in self.resolvers.skipped:
                log.warning("guest_resolver_skipped", source=self.resolvers.source, reason=why)
            if not self.resolvers.nameservers:
                log.warning(
                    "guests_have_no_dns",
                    hint="set net.dns to resolvers the guests can reach",
                    source=self.resolvers.source,
                )
            await asyncio.to_thread(self._instance_use.acquire)
            await self.net.setup_host()
        await self.pool.start()
        await self.hot.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The host table stays while other processes of this instance (a daemon beside
        # `snapfleet run` on one state dir) use it, or a VM of it is left (recovery's, at
        # the next start); the last one out removes it. ip_forward went back when the
        # last clone was destroyed.
        await self.hot.close()
        await self.pool.close()
        if self.net is not None:
            last = await asyncio.to_thread(self._instance_use.release)
            if last and not vms_left(self.settings.paths.state_dir / "vms"):
                await self.net.teardown_host()

    def policy(self, profile: Profile) -> EgressPolicy:
        """The network policy for clones of ``profile``."""
        return profile.policy(self.settings.net)

    @property
    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(
            self.settings.paths.cache_dir / "snapshots",
            self.vmm,
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
            # tsc=reliable: TCG's TSC is steady, but under host load the kernel's
            # clocksource watchdog can judge it unstable against jiffies and fall back
            # to them; every clone of that template then ticks at 250 Hz while idle.
            cmdline += f" tsc_early_khz={self._tsc_khz} tsc=reliable"
        if self.net is not None:
            cmdline += " " + self.net.config.guest_kernel_args()
        if profile.gpus:
            cmdline += " " + self.settings.gpu.guest_cmdline
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
            # One empty root port per GPU: the devices are plugged after the restore.
            pcie_root_ports=profile.gpus,
        )

    async def boot(
        self, profile: Profile, image: Image, *, devices: Devices | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """Cold-boot a VM of ``profile`` on ``image`` (no snapshot) with ``devices``
        attached from the start: a GPU profile's `coldboot` mode."""
        started = time.monotonic()
        machine = await self.hypervisor.boot(self.spec(profile, image), image.rootfs,
                                             policy=policy, devices=devices)
        machine.timings["total"] = time.monotonic() - started
        return machine

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
                    warmup = await machine.exec(Command(
                        script=f"[ ! -e {WARMUP_GUEST_PATH} ] || exec /bin/sh {WARMUP_GUEST_PATH}",
                        timeout=timeout,
                    ))
                    async for chunk in warmup:
                        output = (output + chunk.data)[-2000:]
                    status = await warmup.wait()
            except TimeoutError:
                raise SnapshotError(f"the image's warm-up {WARMUP_GUEST_PATH} hung") from None
            if status.exit_code != 0:
                how = (
                    f"timed out after {timeout:.0f}s"
                    if status.timed_out
                    else f"exit {status.exit_code}, signal {status.signal}"
                )
                detail = output.decode(errors="replace").strip() or "no output"
                raise SnapshotError(
                    f"the image's warm-up {WARMUP_GUEST_PATH} failed ({how}): {detail}"
                )
            # Run one command so the exec path is already warm in every clone; `sync`,
            # so no clone starts by writing back the template's dirty pages: that
            # work, done in every clone, costs each ~4 MiB (bench/density.py).
            session = await machine.exec(Command(argv=["/bin/sync"]))
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
        hot_key: str | None = None,
        policy: EgressPolicy | None = None,
    ) -> Machine:
        """A READY clone of ``snapshot``: hot (already restored, for ``hot_key``), else
        from the warm pool when it has one, else fresh.

        A pooled machine (``pooled`` True) had its setup and spawn (and, hot, its
        restore) paid before the job; they are left out of its timings.
        """
        self._restoring += 1
        self._quiet.clear()
        try:
            return await self._restore(snapshot, env, use_pool, hot_key, policy)
        finally:
            self._restoring -= 1
            if self._restoring == 0:
                self._quiet.set()

    async def _restore(
        self,
        snapshot: Snapshot,
        env: Mapping[str, str] | None,
        use_pool: bool,
        hot_key: str | None,
        policy: EgressPolicy | None,
    ) -> Machine:
        started = time.monotonic()
        if hot_key is not None and (hot := self.hot.acquire(hot_key)) is not None:
            try:
                await self.hypervisor.assign(hot, env=env)
            except RestoreError as exc:  # it died while waiting: assign() destroyed it
                log.warning("hot clone failed at assignment", vm_id=hot.vm_id, error=str(exc))
            else:
                hot.pooled = hot.hot = True
                hot.timings = {"assign": time.monotonic() - started}
                hot.timings["total"] = hot.timings["assign"]
                return hot
        machine = self.pool.acquire(snapshot) if use_pool else None
        if machine is not None:
            machine.timings.pop("setup", None)
            machine.timings.pop("spawn", None)
            try:
                await self.hypervisor.resume(machine, snapshot, env=env, policy=policy)
            except RestoreError as exc:
                # Its VMM may have died while idle, after acquire() looked. resume()
                # has destroyed it already (destroy is idempotent); try once afresh.
                await machine.destroy()
                log.warning("pooled machine failed to resume", vm_id=machine.vm_id, error=str(exc))
                machine = None
            else:
                machine.pooled = True
        if machine is None:
            machine = await self.hypervisor.prepare(snapshot)
            await self.hypervisor.resume(machine, snapshot, env=env, policy=policy)
        machine.timings["total"] = time.monotonic() - started
        return machine

    def hot_key(self, profile: Profile) -> str:
        """What names a profile's hot clones: its whole definition (policy included)."""
        return profile.model_dump_json()

    def keep_hot(self, profile: Profile, snapshot: Snapshot) -> None:
        """Keep ``profile.hot`` clones of ``snapshot`` restored and waiting."""
        self.hot.set_target(self.hot_key(profile), snapshot, profile.hot, self.policy(profile))

    def warm(self, name: str, profile: Profile, snapshot: Snapshot) -> None:
        """Keep ``profile.warm`` machines prepared for ``snapshot`` on behalf of profile ``name``.

        Calling it again with a new snapshot for the same name drops the old one's machines.
        """
        self.pool.set_target(snapshot, profile.warm, slot=name)


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
        cmdline=DEFAULT_CMDLINE,
        manifest={},
    )


__all__ = ["Engine"]
