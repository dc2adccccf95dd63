"""BARs and expansion ROM as captured at init from the host's resource list.

The guest sees the captured address (``start | low flag bits``) and, after
writing all-ones, the size mask; nothing it writes ever moves a BAR.  As in
Linux's bar_init, a BAR whose resource has no flags, or is marked unset,
disabled or busy, reads 0 and sizes to 0 (unimplemented); so does the upper
half of such a 64-bit BAR (Linux would still show the upper address bits of
a resource it refused, which a guest would combine into a bogus BAR).  The
low four flag bits are shown as the kernel keeps them: for a VGA ROM served
from its shadow copy that is IORESOURCE_ROM_SHADOW (bit 1).  A BAR the kernel
fixed (IORESOURCE_PCI_FIXED: legacy IDE ranges, the VGA shadow ROM) is shown
like Linux shows it but is never written back: its address is not what the
device's register holds; nor is an SR-IOV VF's (its BAR registers are
read-only zero, its PF places it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pcibackd.hostpci.port import DeviceInfo, Resource
from pcibackd.wire.pciregs import (BASE_ADDRESS_0, COMMAND_IO, COMMAND_MEM, ROM_ADDRESS,
                                        ROM_ADDRESS1, ROM_ADDRESS_MASK, ROM_ENABLE)

ROM_RESOURCE = 6
_FLAG_BITS = 0xF          # PCI_REGION_FLAG_MASK: the BAR's own low bits, kept in resource flags
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class BarKind:
    """What the rules need to know about one kind of BAR."""

    sizing_ignore: int     # low bits ignored when recognising a sizing write
    decodes: int           # COMMAND bit that enabling the device turns on for it...
    decodes_if: int = 0    # ...provided these bits of its value are set


KINDS = {
    "io": BarKind(0x3, COMMAND_IO),
    "mem32": BarKind(0xF, COMMAND_MEM),
    "mem64": BarKind(0xF, COMMAND_MEM),
    "mem64hi": BarKind(0x0, 0),
    "rom": BarKind(0x7FF, COMMAND_MEM, decodes_if=ROM_ENABLE),
    "none": BarKind(0xF, 0),         # unimplemented BAR: reads 0, sizes to 0
    "norom": BarKind(0x7FF, 0),      # no ROM: a ROM sizing write (0xFFFFF800) is still sizing
}
_REFUSED = Resource.IORESOURCE_UNSET | Resource.IORESOURCE_DISABLED | Resource.IORESOURCE_BUSY


@dataclass(frozen=True)
class Bar:
    """One BAR register of the guest's view."""

    offset: int
    kind: str          # a key of KINDS
    val: int           # what a normal read returns
    size_val: int      # what a read returns after a sizing write
    fixed: bool = False  # the kernel fixed the address: never written back to the device

    @property
    def restorable(self) -> bool:
        """Whether a guest writing the captured value may put it back into the device."""
        return self.kind not in ("none", "norom") and not self.fixed

    @property
    def sizing_ignore(self) -> int:
        return KINDS[self.kind].sizing_ignore

    def is_sizing(self, value: int) -> bool:
        """True if ``value`` is the all-ones sizing write for this BAR."""
        return (value | self.sizing_ignore) & U32 == U32


def bar_offsets(header_type: int) -> tuple[tuple[int, ...], int]:
    """(BAR offsets, ROM offset) of a type-0 or type-1 header."""
    if header_type == 1:
        return (BASE_ADDRESS_0, BASE_ADDRESS_0 + 4), ROM_ADDRESS1
    return tuple(range(BASE_ADDRESS_0, BASE_ADDRESS_0 + 24, 4)), ROM_ADDRESS


def _resource(info: DeviceInfo, index: int) -> Resource | None:
    """The resource behind BAR ``index``, or None when Linux would show it as 0."""
    if index >= len(info.resources):
        return None
    res = info.resources[index]
    if not res.flags or res.flags & _REFUSED or not res.size:
        return None
    return res


def _fixed(res: Resource, info: DeviceInfo) -> bool:
    # A VF's BAR registers are read-only zero (its PF's VF BARs place it): nothing to put back.
    return bool(res.flags & Resource.IORESOURCE_PCI_FIXED) or info.is_virtfn


def capture_bars(info: DeviceInfo, header_type: int) -> dict[int, Bar]:
    """Offset -> Bar for every BAR and the ROM of a device."""
    offsets, rom_offset = bar_offsets(header_type)
    bars: dict[int, Bar] = {}
    upper_of: dict[int, Resource] = {}
    refused_upper: set[int] = set()
    for index, offset in enumerate(offsets):
        if index in upper_of:
            res = upper_of[index]
            neg = -res.size & U64
            bars[offset] = Bar(offset, "mem64hi", (res.start >> 32) & U32, neg >> 32,
                               _fixed(res, info))
            continue
        res = _resource(info, index)
        if res is None or index in refused_upper:
            bars[offset] = Bar(offset, "none", 0, 0)
            raw = info.resources[index] if index < len(info.resources) else None
            if raw is not None and raw.flags & Resource.IORESOURCE_MEM_64:
                refused_upper.add(index + 1)      # its upper half is no BAR of its own either
            continue
        flags = res.flags & _FLAG_BITS
        neg = -res.size & U64
        if res.flags & Resource.IORESOURCE_IO:
            kind = "io"
        elif res.flags & Resource.IORESOURCE_MEM_64 and index + 1 < len(offsets):
            kind = "mem64"
            upper_of[index + 1] = res
        else:
            kind = "mem32"
        bars[offset] = Bar(offset, kind, (res.start & U32) | flags, (neg & U32) | flags,
                           _fixed(res, info))
    rom = _resource(info, ROM_RESOURCE)
    if rom is None:
        bars[rom_offset] = Bar(rom_offset, "norom", 0, 0)
    else:
        # Enable (bit 0) and, for a shadowed VGA ROM, IORESOURCE_ROM_SHADOW (bit 1).
        flags = rom.flags & _FLAG_BITS
        neg = -rom.size & U32
        bars[rom_offset] = Bar(rom_offset, "rom", (rom.start & U32) | flags,
                               (neg & ROM_ADDRESS_MASK) | flags, _fixed(rom, info))
    return bars


def decode_bits(bars: dict[int, Bar]) -> int:
    """COMMAND bits (IO, MEM) that enabling the device turns on in hardware."""
    bits = 0
    for bar in bars.values():
        kind = KINDS[bar.kind]
        if bar.val & kind.decodes_if == kind.decodes_if:
            bits |= kind.decodes
    return bits
