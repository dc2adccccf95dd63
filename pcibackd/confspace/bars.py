"""BARs and expansion ROM as captured at init from the host's resource list.

The guest sees the captured address (``start | low flag bits``) and, after
writing all-ones, the size mask; nothing it writes ever moves a BAR.  A BAR
whose resource is unset reads 0 and sizes to 0 (unimplemented), as in Linux.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcibackd.hostpci.port import DeviceInfo, Resource

ROM_RESOURCE = 6
# Low bits ignored when recognising a sizing write, per BAR kind.
SIZING_IGNORE = {"io": 0x3, "mem32": 0xF, "mem64": 0xF, "mem64hi": 0x0, "rom": 0x7FF, "none": 0xF}
_FLAG_BITS = 0xF          # PCI_REGION_FLAG_MASK: the BAR's own low bits, kept in resource flags
U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Bar:
    """One BAR register of the guest's view."""

    offset: int
    kind: str          # io | mem32 | mem64 | mem64hi | rom | none
    val: int           # what a normal read returns
    size_val: int      # what a read returns after a sizing write

    @property
    def sizing_ignore(self) -> int:
        return SIZING_IGNORE[self.kind]

    def is_sizing(self, value: int) -> bool:
        """True if ``value`` is the all-ones sizing write for this BAR."""
        return (value | self.sizing_ignore) & U32 == U32


def bar_offsets(header_type: int) -> tuple[tuple[int, ...], int]:
    """(BAR offsets, ROM offset) of a type-0 or type-1 header."""
    if header_type == 1:
        return (0x10, 0x14), 0x38
    return tuple(range(0x10, 0x28, 4)), 0x30


def _resource(info: DeviceInfo, index: int) -> Resource | None:
    if index >= len(info.resources):
        return None
    res = info.resources[index]
    return res if res.flags and res.size else None


def capture_bars(info: DeviceInfo, header_type: int) -> dict[int, Bar]:
    """Offset -> Bar for every BAR and the ROM of a device."""
    offsets, rom_offset = bar_offsets(header_type)
    bars: dict[int, Bar] = {}
    upper_of: dict[int, Resource] = {}
    for index, offset in enumerate(offsets):
        if index in upper_of:
            res = upper_of[index]
            neg = -res.size & 0xFFFFFFFFFFFFFFFF
            bars[offset] = Bar(offset, "mem64hi", (res.start >> 32) & U32, neg >> 32)
            continue
        res = _resource(info, index)
        if res is None:
            bars[offset] = Bar(offset, "none", 0, 0)
            continue
        flags = res.flags & _FLAG_BITS
        neg = -res.size & 0xFFFFFFFFFFFFFFFF
        if res.flags & Resource.IORESOURCE_IO:
            kind = "io"
        elif res.flags & Resource.IORESOURCE_MEM_64 and index + 1 < len(offsets):
            kind = "mem64"
            upper_of[index + 1] = res
        else:
            kind = "mem32"
        bars[offset] = Bar(offset, kind, (res.start & U32) | flags, (neg & U32) | flags)
    rom = _resource(info, ROM_RESOURCE)
    if rom is None:
        bars[rom_offset] = Bar(rom_offset, "none", 0, 0)
    else:
        flags = rom.flags & _FLAG_BITS & 0x1          # only the enable bit is defined
        neg = -rom.size & U32
        bars[rom_offset] = Bar(rom_offset, "rom", (rom.start & U32) | flags, (neg & ~0x7FF) | flags)
    return bars


def decode_bits(bars: dict[int, Bar]) -> int:
    """COMMAND bits (IO=1, MEM=2) that enabling the device turns on in hardware."""
    bits = 0
    for bar in bars.values():
        if bar.kind == "io":
            bits |= 0x1
        elif bar.kind in ("mem32", "mem64") or (bar.kind == "rom" and bar.val & 1):
            bits |= 0x2
    return bits
