"""The vocabulary the simulated hardware's register tables are written in.

An :class:`HwReg` says which bits of one register hardware lets software
change: ``rw`` (a write replaces the bit) and ``rw1c`` (writing 1 clears it);
every other bit is read-only.  A mask may depend on the device, so it is
either a number or a function of a :class:`Ctx` (the function's config bytes
and sysfs resources).  This is a model of hardware, not of xen-pciback's
rules (those are ``pcibackd.confspace.spec.Reg``).

BAR sizing lives here because the header BARs, the ROM and the SR-IOV VF BARs
share it (PCI LB 3.0 §6.2.5.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pcibackd.hostpci.port import Resource

U16 = 0xFFFF
U32 = 0xFFFF_FFFF

MEM_BAR_MIN, IO_BAR_MIN, ROM_MIN = 16, 4, 2048


class Ctx:
    """What a table predicate may look at: the config bytes, the block base, resources."""

    def __init__(self, cfg: bytes, resources: tuple[Resource, ...], virtfn: bool = False) -> None:
        self.cfg = cfg
        self.resources = resources
        self.virtfn = virtfn              # an SR-IOV virtual function
        self.base = 0
        self.pcie: int | None = None      # offset of the PCI Express capability
        self.memo: dict = {}

    def u8(self, rel: int) -> int:
        return self.cfg[self.base + rel]

    def u16(self, rel: int) -> int:
        return int.from_bytes(self.cfg[self.base + rel:self.base + rel + 2], "little")

    def u32(self, rel: int) -> int:
        return int.from_bytes(self.cfg[self.base + rel:self.base + rel + 4], "little")

    def at16(self, offset: int) -> int:
        return int.from_bytes(self.cfg[offset:offset + 2], "little")

    def resource_size(self, index: int) -> int:
        return self.resources[index].size if index < len(self.resources) else 0


Mask = int | Callable[[Ctx], int]


@dataclass(frozen=True)
class HwReg:
    """One register of a table: offset relative to its block (header or capability)."""

    name: str
    offset: int
    size: int
    rw: Mask = 0
    rw1c: Mask = 0
    when: Callable[[Ctx], bool] | None = None
    init: Callable[[Ctx], int | None] | None = None   # forced power-on value, None = keep dump
    hook: str | None = None                           # name in hwtables.HOOKS


def mask_value(value: Mask, ctx: Ctx) -> int:
    """The mask ``value`` evaluated for the device in ``ctx``."""
    return value(ctx) if callable(value) else value


# --- BAR sizing -------------------------------------------------------------------

def pow2_at_least(size: int, minimum: int) -> int:
    """The size a BAR decodes for a resource of ``size`` bytes (0: unimplemented)."""
    return max(minimum, 1 << (size - 1).bit_length()) if size else 0


def _type_bits_from_flags(flags: int) -> int:
    if flags & Resource.IORESOURCE_IO:
        return 0x1
    return ((0x4 if flags & Resource.IORESOURCE_MEM_64 else 0)
            | (0x8 if flags & Resource.IORESOURCE_PREFETCH else 0))


def bar_layout(ctx: Ctx, first: int, count: int, res_index: int,
               divisor: int = 1) -> list[tuple[int, int | None]]:
    """(rw mask, forced initial value) per BAR dword; resource ``res_index + i`` sizes BAR i.

    Address bits at and above log2(size) are writable, the type bits are
    read-only, so writing all-ones reads back the size mask (PCI LB 3.0 §6.2.5.1).
    An unimplemented BAR (no resource) reads 0 and ignores writes.
    """
    key = ("bars", first, count, res_index, divisor)
    if key in ctx.memo:
        return ctx.memo[key]
    out: list[tuple[int, int | None]] = []
    i = 0
    while i < count:
        off = first + 4 * i
        raw = int.from_bytes(ctx.cfg[off:off + 4], "little")
        res = (ctx.resources[res_index + i] if res_index + i < len(ctx.resources)
               else Resource(0, 0, 0))
        per_bar = res.size // divisor if divisor else 0
        if per_bar == 0:
            out.append((0, 0))
            i += 1
            continue
        if raw:
            type_bits = raw & 0x3 if raw & 1 else raw & 0xF
        else:
            type_bits = _type_bits_from_flags(res.flags)
        is_io = bool(type_bits & 1)
        size = pow2_at_least(per_bar, IO_BAR_MIN if is_io else MEM_BAR_MIN)
        low_ro = 0x3 if is_io else 0xF
        out.append((~(size - 1) & ~low_ro & U32, None if raw else type_bits))
        if not is_io and type_bits & 0x6 == 0x4 and i + 1 < count:
            out.append(((~(size - 1) >> 32) & U32, None))
            i += 1
        i += 1
    ctx.memo[key] = out
    return out


BarRule = tuple[Callable[[Ctx], int], Callable[[Ctx], int | None]]


def bar_rule(layout: Callable[[Ctx], list[tuple[int, int | None]]], i: int) -> BarRule:
    """(rw, init) functions of BAR ``i`` of the BAR block that ``layout`` sizes."""
    return (lambda ctx: layout(ctx)[i][0]), (lambda ctx: layout(ctx)[i][1])
