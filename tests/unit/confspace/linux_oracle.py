"""What Linux xen-pciback shows a guest, written as data from its rules (not from our code).

The facts (mainline drivers/xen/xen-pciback, conf_space_header.c and
conf_space_capability.c): vendor/device read the kernel's identity
(``dev->vendor``/``dev->device``, so a VF shows its real IDs); COMMAND and STATUS
read the device with their reserved bits clear; a BAR reads ``start | low four
flag bits`` of the kernel's resource and sizes to ``-size | low four flag bits``,
except that a resource with no flags, or marked UNSET / DISABLED / BUSY, reads 0
and sizes to 0 (the upper dword of a 64-bit BAR takes the upper half of its lower
BAR's resource); the interrupt line reads the kernel's IRQ; the PM capability
reads PME support as 0 and PMCSR's reserved bits as 0 (PME enable is cleared at
seize); every other register reads the device.

On the write side (``ALLOWED_HW``): COMMAND's enable, bus master and MWI,
cache-line size, BIST start, PMCSR's PME status (RW1C), data select and power
state, and the VPD address (never its F flag) may change in the device; a BAR
write only ever restores the value the guest is shown.
"""

from __future__ import annotations

from simdom0.dumps import Dump
from pcibackd.hostpci.port import Resource

U32 = 0xFFFFFFFF
UNSET, DISABLED, BUSY = (Resource.IORESOURCE_UNSET, Resource.IORESOURCE_DISABLED,
                         Resource.IORESOURCE_BUSY)
MEM64 = Resource.IORESOURCE_MEM_64
ZERO = Resource(0, 0, 0)
CAP_PM, CAP_VPD = 0x01, 0x03

# (offset in header, size, bits that read 0 for the guest)
HEADER_MASKED = ((0x04, 2, 0xF800), (0x06, 2, 0x0006))
# capability id -> ((offset in cap, size, bits that read 0), ...)
CAP_MASKED = {CAP_PM: ((2, 2, 0xF800), (4, 2, 0x00F4))}

# Device bits a guest may change (default policy: not permissive, no interrupt control).
# Header: offset -> (size, mask); capabilities: cap id -> ((offset in cap, size, mask), ...)
IO, MEMSP, MASTER, MWI = 0x1, 0x2, 0x4, 0x10
ALLOWED_HEADER = {0x04: (2, IO | MEMSP | MASTER | MWI), 0x0C: (1, 0xFF), 0x0F: (1, 0x40)}
ALLOWED_CAP = {CAP_PM: ((4, 2, 0x8000 | 0x1E00 | 0x0003),), CAP_VPD: ((2, 2, 0x7FFF),)}


def _res(resources: tuple[Resource, ...], index: int) -> Resource:
    return resources[index] if index < len(resources) else ZERO


def linux_bar(resources: tuple[Resource, ...], index: int) -> tuple[int, int]:
    """(value, sizing read-back) Linux's xen-pciback shows for BAR ``index`` (6: the ROM)."""
    res = _res(resources, index)
    if 0 < index < 6 and _res(resources, index - 1).flags & MEM64:
        lower = _res(resources, index - 1)
        if lower.flags & (UNSET | DISABLED | BUSY) or not lower.flags:
            return 0, 0            # deliberate: no half-BAR of a refused resource (see bars.py)
        return lower.start >> 32, (-lower.size >> 32) & U32
    if not res.flags or res.flags & (UNSET | DISABLED | BUSY):
        return 0, 0
    size = res.end - res.start + 1
    low = res.flags & 0xF
    mask = 0xFFFFF800 if index == 6 else U32
    return (res.start & U32) | low, (-size & mask) | low


def bar_layout(hw: bytes) -> dict[int, int]:
    """Config offset of every BAR/ROM register -> its resource index, by header type."""
    if hw[0x0E] & 0x7F == 1:
        return {0x10: 0, 0x14: 1, 0x38: 6}
    return {**{0x10 + 4 * i: i for i in range(6)}, 0x30: 6}


def legacy_caps(hw: bytes) -> list[tuple[int, int]]:
    """(offset, id) of the legacy capability list, walked as Linux's pci_find_capability."""
    out: list[tuple[int, int]] = []
    if not int.from_bytes(hw[6:8], "little") & 0x10:
        return out
    ptr, seen = hw[0x34] & 0xFC, set()
    while ptr >= 0x40 and ptr not in seen and len(seen) < 48:
        seen.add(ptr)
        out.append((ptr, hw[ptr]))
        ptr = hw[ptr + 1] & 0xFC
    return out


def _mask(v: bytearray, off: int, size: int, bits: int) -> None:
    value = int.from_bytes(v[off:off + size], "little") & ~bits
    v[off:off + size] = value.to_bytes(size, "little")


def linux_view(d: Dump, hw: bytes) -> bytes:
    """The guest view at reset of the function ``d`` whose device registers now read ``hw``."""
    v = bytearray(hw)
    v[0:2] = d.ids["vendor"].to_bytes(2, "little")
    v[2:4] = d.ids["device"].to_bytes(2, "little")
    for off, size, bits in HEADER_MASKED:
        _mask(v, off, size, bits)
    for off, index in bar_layout(hw).items():
        v[off:off + 4] = linux_bar(d.resources, index)[0].to_bytes(4, "little")
    v[0x3C] = d.irq & 0xFF
    for base, cap_id in legacy_caps(hw):
        for off, size, bits in CAP_MASKED.get(cap_id, ()):
            _mask(v, base + off, size, bits)
    return bytes(v)


def allowed_hw(hw: bytes) -> bytearray:
    """Per-byte mask of device bits a default-policy guest may change."""
    allowed = bytearray(len(hw))

    def put(off: int, size: int, mask: int) -> None:
        allowed[off:off + size] = mask.to_bytes(size, "little")
    for off, (size, mask) in ALLOWED_HEADER.items():
        put(off, size, mask)
    for base, cap_id in legacy_caps(hw):
        for off, size, mask in ALLOWED_CAP.get(cap_id, ()):
            put(base + off, size, mask)
    return allowed


# Linux's fields (conf_space_header.c, conf_space_capability.c): (offset, size, bits a
# permissive guest may change in the device through the field's handler).  An access that
# overlaps any field is handled by the fields alone; any other access is written as it is
# when permissive.
PERMISSIVE_HEADER_COMMON = ((0x00, 2, 0), (0x02, 2, 0),
                            (0x04, 2, IO | MEMSP | 0x02BC | 0x0400),   # enable, guest bits, INTx
                            (0x0C, 1, 0xFF), (0x0D, 1, 0), (0x0F, 1, 0x40),
                            (0x3C, 1, 0), (0x3D, 1, 0))
PERMISSIVE_BARS = {0: ((0x10, 24), (0x30, 4)), 1: ((0x10, 8), (0x38, 4))}
PERMISSIVE_CAPS = {CAP_PM: ((0, 2, 0), (2, 2, 0), (4, 2, 0x8000 | 0x1E00 | 0x0003),
                            (6, 1, 0), (7, 1, 0)),
                   CAP_VPD: ((0, 2, 0), (2, 2, 0x7FFF), (4, 4, 0)),
                   0x05: ((0, 2, 0), (2, 2, 0xFFFF)),     # MSI flags: written as they are
                   0x11: ((0, 2, 0), (2, 2, 0xFFFF))}     # MSI-X flags: likewise


def permissive_fields(hw: bytes) -> tuple[bytearray, bytearray]:
    """(is a Linux field byte, device bits its handler may change) per config byte."""
    field, allowed = bytearray(len(hw)), bytearray(len(hw))

    def put(off: int, size: int, mask: int) -> None:
        field[off:off + size] = b"\x01" * size
        allowed[off:off + size] = mask.to_bytes(size, "little")
    for off, size, mask in PERMISSIVE_HEADER_COMMON:
        put(off, size, mask)
    for off, size in PERMISSIVE_BARS.get(hw[0x0E] & 0x7F, ()):
        put(off, size, 0)                   # BAR writes only ever restore (checked apart)
    seen: set[int] = set()
    for base, cap_id in legacy_caps(hw):
        if cap_id in PERMISSIVE_CAPS and cap_id not in seen:     # pci_find_capability: first
            seen.add(cap_id)
            for off, size, mask in PERMISSIVE_CAPS[cap_id]:
                put(base + off, size, mask)
    return field, allowed
