"""Accelerator choice: `auto` must never pick PVM's KVM for a stock kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import HostError
from runner.host import resolve_accel


@pytest.fixture
def kvm(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.touch()
    return dev


@pytest.mark.parametrize(
    ("requested", "has_kvm", "pvm", "expected"),
    [
        ("auto", True, False, ("kvm", "host")),
        ("auto", True, True, ("tcg", "max")),
        ("auto", False, False, ("tcg", "max")),
        ("tcg", True, False, ("tcg", "max")),
        ("kvm", True, False, ("kvm", "host")),
    ],
)
def test_choice_table(
    tmp_path: Path, kvm: Path, requested: str, has_kvm: bool, pvm: bool, expected: tuple[str, str]
) -> None:
    pvm_dir = tmp_path / "kvm_pvm"
    if pvm:
        pvm_dir.mkdir()
    device = kvm if has_kvm else tmp_path / "absent"
    choice = resolve_accel(requested, kvm_device=device, pvm_module=pvm_dir)  # type: ignore[arg-type]
    assert (choice.accel, choice.cpu) == expected


def test_explicit_kvm_refused_on_pvm(tmp_path: Path, kvm: Path) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    with pytest.raises(HostError, match="PVM"):
        resolve_accel("kvm", kvm_device=kvm, pvm_module=tmp_path / "kvm_pvm")


def test_explicit_kvm_refused_without_device(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="missing or not accessible"):
        resolve_accel("kvm", kvm_device=tmp_path / "none", pvm_module=tmp_path / "none")


def test_this_host_auto() -> None:
    choice = resolve_accel("auto")
    if Path("/sys/module/kvm_pvm").exists():
        assert choice.accel == "tcg"
        assert "PVM" in choice.reason
