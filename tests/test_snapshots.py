"""Snapshot manifests: a snapshot that does not fit this host is a clear error."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from runner.config import Settings
from runner.engine import Engine
from runner.errors import SnapshotError, SnapshotMismatch
from runner.snapshots import FILES, MANIFEST_VERSION, SnapshotStore, Vmm, snapshot_key
from runner.vm.backend import MachineSpec
from runner.vm.qemu_args import device_layout

SPEC = MachineSpec(
    vcpus=1, memory_mib=512, kernel=Path("/k"), initramfs=Path("/i"), cmdline="console=ttyS0",
    accel="tcg", cpu="max",
)


def qemu(version: str = "7.2.22", name: str = "qemu") -> Vmm:
    return Vmm(name, version, device_layout)


def fake_snapshot(root: Path, *, qemu: str = "7.2.22", layout: dict[str, object] | None = None,
                  missing: str | None = None) -> Path:
    path = root / "snap"
    path.mkdir(parents=True)
    for name in FILES:
        if name != missing:
            (path / name).write_bytes(b"x")
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "backend": {"name": "qemu", "version": qemu,
                    "layout": layout or device_layout(SPEC)},
        "spec": {"vcpus": 1, "memory_mib": 512, "cmdline": "console=ttyS0", "accel": "tcg",
                 "cpu": "max", "network": True},
        "sha256": {},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_matching_snapshot_loads(tmp_path: Path) -> None:
    snap = SnapshotStore(tmp_path, qemu()).load(fake_snapshot(tmp_path))
    assert snap.spec.memory_mib == 512
    assert snap.memory == snap.path / "memory"


def test_other_qemu_version_is_refused(tmp_path: Path) -> None:
    path = fake_snapshot(tmp_path, qemu="8.2.0")
    wanted = r"backend\.version='8\.2\.0', this host has '7\.2\.22'"
    with pytest.raises(SnapshotMismatch, match=wanted):
        SnapshotStore(tmp_path, qemu()).load(path)


def test_other_device_layout_is_refused(tmp_path: Path) -> None:
    layout = device_layout(replace(SPEC, network=False))
    path = fake_snapshot(tmp_path, layout=layout)
    with pytest.raises(SnapshotMismatch, match=r"backend\.layout\.devices"):
        SnapshotStore(tmp_path, qemu()).load(path)


def test_incomplete_snapshot_is_refused(tmp_path: Path) -> None:
    path = fake_snapshot(tmp_path, missing="state")
    with pytest.raises(SnapshotError, match="incomplete: state is missing"):
        SnapshotStore(tmp_path, qemu()).load(path)


def test_unreadable_manifest(tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "manifest.json").write_text("{nope")
    with pytest.raises(SnapshotError, match="cannot read snapshot manifest"):
        SnapshotStore(tmp_path, qemu()).load(tmp_path / "snap")


def test_key_covers_what_a_restore_depends_on() -> None:
    base = snapshot_key("img", SPEC, qemu())
    assert base == snapshot_key("img", SPEC, qemu())
    assert base != snapshot_key("img2", SPEC, qemu())
    assert base != snapshot_key("img", SPEC, qemu("8.0.0"))
    assert base != snapshot_key("img", SPEC, qemu(name="firecracker"))
    assert base != snapshot_key("img", replace(SPEC, vcpus=2), qemu())
    assert base != snapshot_key("img", replace(SPEC, cmdline="console=ttyS0 quiet"), qemu())


def test_other_backend_is_refused(tmp_path: Path) -> None:
    path = fake_snapshot(tmp_path)
    with pytest.raises(SnapshotMismatch, match=r"backend\.name='qemu', this host has 'toy'"):
        SnapshotStore(tmp_path, qemu(name="toy")).load(path)


@pytest.mark.vm
async def test_forced_creation_replaces_the_snapshot(engine: Engine, settings: Settings) -> None:
    # Its own shape, so the session's snapshot (used by other tests) is left alone.
    profile = settings.profile().model_copy(update={"memory_mib": 384})
    first = await engine.snapshot(profile, lambda _m: None)
    again = await engine.snapshot(profile, lambda _m: None)
    assert again.path == first.path
    assert again.manifest["created_at"] == first.manifest["created_at"]  # found, not remade
    time.sleep(1.1)  # created_at has one-second resolution
    forced = await engine.snapshot(profile, lambda _m: None, force=True)
    assert forced.path == first.path
    assert forced.manifest["created_at"] != first.manifest["created_at"]
    await forced.verify()
    assert not [p for p in forced.path.parent.iterdir() if p.name.startswith(".tmp-")]
