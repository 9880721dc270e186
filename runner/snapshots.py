"""Snapshots: a booted, idle template frozen to files that clones restore from.

A snapshot directory holds ``memory`` (the guest RAM, mapped copy-on-write by
every clone), ``state`` (QEMU device state, RAM excluded via x-ignore-shared),
``disk.raw`` (the template's disk, a read-only base for clone overlays), the
kernel and initramfs it booted, and ``manifest.json``. It is addressed by a
key over everything that must match at restore: image digest, VM shape, and
the backend's section (its name, version and device layout).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from runner import disk
from runner.errors import SnapshotError, SnapshotMismatch
from runner.images.cache import Holds, building, layer_path, remove_stale_temps
from runner.vm.backend import MachineSpec

MANIFEST_VERSION = 3
# How a template is brought to its save (the engine's template booter). Part of the
# key: a change there makes new snapshots, old ones stay loadable. 2: the template
# syncs its disk last, so its clones start with nothing to write back.
TEMPLATE_REVISION = 2
LAYER = "snapshot"  # directories are snapshot-<key>, like the image cache's layers
SNAPSHOTS_DIR = "snapshots"  # the store's root under the cache dir
FILES = ("memory", "state", "disk.raw", "overlay.qcow2", "vmlinux", "initramfs")


@dataclass(frozen=True)
class Vmm:
    """The backend a snapshot is made by and for: it is reused only by the same one."""

    name: str
    version: str
    layout: Callable[[MachineSpec], dict[str, object]]

    def section(self, spec: MachineSpec) -> dict[str, object]:
        """The manifest's backend section for a VM of ``spec``."""
        return {"name": self.name, "version": self.version, "layout": self.layout(spec)}


@dataclass(frozen=True)
class Snapshot:
    """A stored snapshot, checked against this host when loaded."""

    path: Path
    key: str
    spec: MachineSpec
    manifest: dict[str, Any]

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def disk(self) -> Path:
        return self.path / "disk.raw"

    @property
    def overlay(self) -> Path:
        """An empty qcow2 backed by ``disk``: each clone starts from a copy of it."""
        return self.path / "overlay.qcow2"

    def check_compatible(self) -> None:
        """Cheap check that the files a restore opens are all there."""
        for name in FILES:
            if not (self.path / name).exists():
                raise SnapshotError(f"snapshot {self.key} is incomplete: {name} is missing")

    async def verify(self) -> None:
        """Re-hash every file against the manifest (slow: reads the whole memory file)."""
        sums = await asyncio.to_thread(_checksums, self.path)
        for name, expected in self.manifest["sha256"].items():
            if sums.get(name) != expected:
                raise SnapshotError(f"snapshot {self.key}: {name} does not match its checksum")


def snapshot_key(image_digest: str, spec: MachineSpec, vmm: Vmm) -> str:
    """The address of a snapshot: everything a restore depends on."""
    ident = {
        "manifest_version": MANIFEST_VERSION,
        "template": TEMPLATE_REVISION,
        "image": image_digest,
        "backend": vmm.section(spec),
        "cmdline": spec.cmdline,
        "network": spec.network,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class SnapshotStore:
    """Snapshots under one directory (normally ``<cache_dir>/snapshots``)."""

    def __init__(self, root: Path, vmm: Vmm, *, qemu_img: str = "qemu-img") -> None:
        self.root = root
        self.vmm = vmm
        self.qemu_img = qemu_img

    def find(self, image_digest: str, spec: MachineSpec) -> Snapshot | None:
        """The snapshot for this image and shape, or None if it was never made."""
        path = self._path(snapshot_key(image_digest, spec, self.vmm))
        return self.load(path) if (path / "manifest.json").exists() else None

    def load(self, path: Path) -> Snapshot:
        """Read a snapshot directory and check it fits this host's backend."""
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"cannot read snapshot manifest in {path}: {exc}") from exc
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            raise SnapshotMismatch(
                "manifest_version", manifest.get("manifest_version"), MANIFEST_VERSION
            )
        spec = _spec_from_manifest(path, manifest)
        recorded, current = manifest["backend"], self.vmm.section(spec)
        for name in ("name", "version"):
            if recorded.get(name) != current[name]:
                raise SnapshotMismatch(f"backend.{name}", recorded.get(name), current[name])
        layout, wanted = recorded.get("layout") or {}, self.vmm.layout(spec)
        if layout != wanted:
            field = next(k for k in wanted if layout.get(k) != wanted[k])
            raise SnapshotMismatch(f"backend.layout.{field}", layout.get(field), wanted[field])
        key = manifest.get("key", path.name)  # the hash; the directory adds a prefix
        snapshot = Snapshot(path=path, key=key, spec=spec, manifest=manifest)
        snapshot.check_compatible()
        return snapshot

    def list(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if (p / "manifest.json").exists())

    async def create(
        self,
        template: TemplateBooter,
        image_digest: str,
        spec: MachineSpec,
        rootfs: Path,
        progress: Callable[[str], None] = lambda _m: None,
    ) -> Snapshot:
        """Boot a template, let it settle, snapshot it, and store it atomically."""
        key = snapshot_key(image_digest, spec, self.vmm)
        final = self._path(key)
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        await asyncio.to_thread(remove_stale_temps, self.root)
        try:
            # Built in a temp dir, renamed into place when complete (a forced
            # re-creation replaces the old one); removed on any failure. The
            # image's directories stay share-locked meanwhile, so `cache gc`
            # does not take them away half-way through the copy.
            with Holds() as holds:
                for source in {spec.kernel.parent, spec.initramfs.parent, rootfs.parent}:
                    holds.take(source)
                async with building(self.root, LAYER, key) as tmp:
                    await self._build(
                        tmp, final, key, template, image_digest, spec, rootfs, progress
                    )
        except (asyncio.CancelledError, SnapshotError):
            raise
        except Exception as exc:
            raise SnapshotError(f"snapshot creation failed: {exc}") from exc
        progress(f"snapshot {key} stored in {final}")
        return self.load(final)

    async def _build(
        self,
        tmp: Path,
        final: Path,
        key: str,
        template: TemplateBooter,
        image_digest: str,
        spec: MachineSpec,
        rootfs: Path,
        progress: Callable[[str], None],
    ) -> None:
        started = time.monotonic()
        tmp_spec = await _stage_files(tmp, spec, rootfs, progress)
        progress("booting template VM (cold boot; slow under TCG)")
        boot_s = await template(tmp_spec, tmp / "disk.raw", tmp / "memory", tmp / "state")
        await disk.create_overlay(
            tmp / "disk.raw", tmp / "overlay.qcow2", qemu_img=self.qemu_img,
            backing_path=final / "disk.raw",
        )
        progress("hashing snapshot files")
        sums = await asyncio.to_thread(_checksums, tmp)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "key": key,
            "image_digest": image_digest,
            "backend": self.vmm.section(spec),
            "spec": {
                "vcpus": spec.vcpus,
                "memory_mib": spec.memory_mib,
                "cmdline": spec.cmdline,
                "accel": spec.accel,
                "cpu": spec.cpu,
                "network": spec.network,
                "tcg_tb_size_mib": spec.tcg_tb_size_mib,
                "pcie_root_ports": spec.pcie_root_ports,
            },
            "sha256": sums,
            "sizes": {name: (tmp / name).stat().st_size for name in FILES},
            "template_boot_s": round(boot_s, 3),
            "created_s": round(time.monotonic() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in (*FILES, "manifest.json"):
            os.chmod(tmp / name, 0o444)

    def _path(self, key: str) -> Path:
        return layer_path(self.root, LAYER, key)


class TemplateBooter(Protocol):
    """Boots a template on (spec, disk, memory file), saves its state, returns boot seconds."""

    async def __call__(self, spec: MachineSpec, disk: Path, memory: Path, state: Path) -> float: ...


async def _stage_files(
    tmp: Path, spec: MachineSpec, rootfs: Path, progress: Callable[[str], None]
) -> MachineSpec:
    for src, name in ((spec.kernel, "vmlinux"), (spec.initramfs, "initramfs")):
        try:
            os.link(src, tmp / name)
        except OSError:
            shutil.copyfile(src, tmp / name)
    progress(f"copying root filesystem {rootfs.name}")
    await disk.copy_sparse(rootfs, tmp / "disk.raw")
    os.chmod(tmp / "disk.raw", 0o600)
    return replace(spec, kernel=tmp / "vmlinux", initramfs=tmp / "initramfs")


def _spec_from_manifest(path: Path, manifest: dict[str, Any]) -> MachineSpec:
    s = manifest["spec"]
    return MachineSpec(
        vcpus=s["vcpus"],
        memory_mib=s["memory_mib"],
        kernel=path / "vmlinux",
        initramfs=path / "initramfs",
        cmdline=s["cmdline"],
        accel=s["accel"],
        cpu=s["cpu"],
        network=s["network"],
        tcg_tb_size_mib=s.get("tcg_tb_size_mib", 0),
        pcie_root_ports=s.get("pcie_root_ports", 0),
    )


def _checksums(directory: Path) -> dict[str, str]:
    sums = {}
    for name in FILES:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        sums[name] = digest.hexdigest()
    return sums
