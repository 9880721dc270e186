"""Just enough ELF64 reading for kernel modules and busybox (no I/O)."""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3


def _check(data: bytes) -> None:
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")


def section(data: bytes, name: str) -> bytes | None:
    """Contents of section ``name``, or None if the file has no such section."""
    _check(data)
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        sh_name = struct.unpack_from("<I", data, base)[0]
        sh_offset, sh_size = struct.unpack_from("<QQ", data, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    wanted = name.encode()
    for i in range(shnum):
        sh_name, off, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end] == wanted:
            return data[off : off + size]
    return None


def modinfo(data: bytes) -> dict[str, str]:
    """The ``.modinfo`` key=value pairs of a kernel module (first value wins)."""
    raw = section(data, ".modinfo") or b""
    info: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def module_depends(data: bytes) -> list[str]:
    """Modules this one needs loaded first (modpost's ``depends=``)."""
    value = modinfo(data).get("depends", "")
    return [d for d in value.split(",") if d]


def is_static(data: bytes) -> bool:
    """True if the executable has no program interpreter (no ld.so needed)."""
    _check(data)
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == _PT_INTERP:
            return False
    return True
