"""GPU settings: the host's inventory (`[gpu]`) and what a profile asks for.

``GpuSettings`` is the `[gpu]` section; ``GpuProfileFields`` is mixed into
``Profile`` so a profile says `gpus = N`, `gpu = "10de:2684"` (a model) and
`gpu_mode = "hotplug" | "coldboot"`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

GpuMode = Literal["hotplug", "coldboot"]
GpuSource = Literal["vfio", "edu"]

_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_MODEL = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_HEX4 = re.compile(r"^[0-9a-f]{4}$")
_CLASS = re.compile(r"^[0-9a-f]{2}([0-9a-f]{2})?$")

# Display controllers (0x03xx) and processing accelerators (0x12xx).
DEFAULT_CLASSES = ("03", "12")


def _pci_address(value: str) -> str:
    value = value.strip().lower()
    if re.fullmatch(r"[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", value):
        value = "0000:" + value  # `lspci` prints addresses without the domain
    if not _ADDRESS.match(value):
        raise ValueError(f"{value!r} is not a PCI address like 0000:01:00.0")
    return value


def _model(value: str) -> str:
    value = value.strip().lower().replace("0x", "")
    if not _MODEL.match(value):
        raise ValueError(f"{value!r} is not a PCI vendor:device id like 10de:2684")
    return value


def _vendor(value: str) -> str:
    value = value.strip().lower().removeprefix("0x")
    if not _HEX4.match(value):
        raise ValueError(f"{value!r} is not a PCI vendor id like 10de")
    return value


def _class_prefix(value: str) -> str:
    value = value.strip().lower().removeprefix("0x")
    if not _CLASS.match(value):
        raise ValueError(f"{value!r} is not a PCI class prefix like 03 or 0302")
    return value


PciAddress = Annotated[str, AfterValidator(_pci_address)]
GpuModel = Annotated[str, AfterValidator(_model)]
VendorId = Annotated[str, AfterValidator(_vendor)]
ClassPrefix = Annotated[str, AfterValidator(_class_prefix)]


class GpuSettings(BaseModel):
    """Which host devices Snapfleet may pass to jobs, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: list[PciAddress] | Literal["auto"] = Field(default_factory=list)
    """PCI addresses of the GPUs to hand out (each with the rest of its IOMMU group),
    or `auto`: every passable display/accelerator device that matches `vendors` and
    `classes` and that no host driver uses. Empty (the default) = no GPUs."""
    vendors: list[VendorId] = Field(default_factory=list)
    """With `auto`: only these vendors (e.g. `["10de"]`); empty = any vendor."""
    classes: list[ClassPrefix] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    """With `auto`: PCI class prefixes that count as GPUs (`03` display, `12` accelerators)."""
    source: GpuSource = "vfio"
    """`vfio` passes host devices; `edu` hands out QEMU's emulated test device (no
    hardware; for testing the plumbing only)."""
    edu_devices: Annotated[int, Field(ge=0, le=16)] = 0
    """With `source = "edu"`: how many emulated devices to hand out."""
    hotplug_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """After `device_add`, how long the guest may take to bind the device."""
    guest_cmdline: Annotated[str, Field(pattern=r"^[^\n]*$")] = "pcie_ports=native"
    """Added to the guest kernel command line of GPU profiles. Hot-plug needs
    `pcie_ports=native` (the microVM's firmware tables grant the guest no native PCIe
    hot-plug); a GPU with large BARs may also need e.g. `pci=hpmmioprefsize=64G`."""
    bind_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    """How long a host driver may take to let go of a device (or to take it back)."""

    @model_validator(mode="after")
    def _source_fits(self) -> GpuSettings:
        if self.source == "edu" and self.devices:
            raise ValueError("gpu.devices names host devices, but gpu.source is 'edu'")
        if self.source == "vfio" and self.edu_devices:
            raise ValueError("gpu.edu_devices needs gpu.source = 'edu'")
        return self


class GpuProfileFields(BaseModel):
    """A profile's GPU request (mixed into ``Profile``)."""

    gpus: Annotated[int, Field(ge=0, le=8)] = 0
    """GPUs (whole IOMMU groups) passed to each VM of this profile."""
    gpu: GpuModel | None = None
    """Only GPUs of this model (`vendor:device`, as `lspci -nn` shows); implies `gpus = 1`."""
    gpu_mode: GpuMode = "hotplug"
    """`hotplug`: restore a GPU-less snapshot, then hot-plug the GPU (fast); `coldboot`:
    boot each VM with the GPU attached (slow; for guests that cannot take a hot-plug)."""

    @model_validator(mode="before")
    @classmethod
    def _model_implies_one(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gpu") and "gpus" not in data:
            return {**data, "gpus": 1}
        return data

    @model_validator(mode="after")
    def _model_needs_count(self) -> GpuProfileFields:
        if self.gpu is not None and self.gpus == 0:
            raise ValueError(f"gpu = {self.gpu!r} names a model but gpus = 0")
        return self

    def gpu_request(self) -> GpuRequest | None:
        """What the allocator must hand a VM of this profile, or None."""
        return GpuRequest(self.gpus, self.gpu) if self.gpus else None


@dataclass(frozen=True)
class GpuRequest:
    """``count`` GPUs, all of ``model`` when it is set."""

    count: int
    model: str | None = None

    def __str__(self) -> str:
        return f"{self.count} GPU" + ("" if self.model is None else f" of model {self.model}")
