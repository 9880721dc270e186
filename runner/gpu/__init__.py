"""GPU passthrough, host side: discovery, vfio-pci binding, leases, quarantine, doctor.

The VM side asks a ``DeviceSource`` for the QEMU ``device_add`` arguments of
the units a ``GpuAllocator`` hands it; ``runner.gpu.doctor`` says what this
host can pass through and why.
"""

from runner.gpu.allocator import GpuAllocator, GpuLease, RecoveryReport
from runner.gpu.binding import Bound, VfioBinder
from runner.gpu.config import GpuMode, GpuProfileFields, GpuRequest, GpuSettings
from runner.gpu.source import DeviceSource, EduSource, VfioSource, device_option, make_source
from runner.gpu.sysfs import Assessment, GpuUnit, PciFunction, Sysfs, assess, scan

__all__ = [
    "Assessment", "Bound", "DeviceSource", "EduSource", "GpuAllocator", "GpuLease", "GpuMode",
    "GpuProfileFields", "GpuRequest", "GpuSettings", "GpuUnit", "PciFunction", "RecoveryReport",
    "Sysfs", "VfioBinder", "VfioSource", "assess", "device_option", "make_source", "scan",
]
