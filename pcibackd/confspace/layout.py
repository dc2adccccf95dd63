"""Per-device layout: which register owns each config-space byte (vfio's config map).

:class:`Builder` reads the device once through the port, walks the capability
lists (bounded, loop-safe: the lists come from hardware), binds the header and
capability tables to absolute offsets, relinks the lists past hidden
capabilities, adds policy quirks, fills the remaining gaps with "unowned"
registers and precomputes, for every aligned (offset, size), the mask of bits
that come from the emulated copy.  The result is an immutable :class:`Layout`
plus the initial emulated bytes.  The only device write at build time is a
capability's setup hook (clearing PM's PME enable).  Init and setup hooks see
the Builder as a :class:`~.spec.BuildView`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loguru import logger

from pcibackd.hostpci.port import DeviceInfo, HostPort
from pcibackd.confspace.bars import Bar, capture_bars, decode_bits
from pcibackd.confspace.caps import GROUPS, HEADER_ONLY
from pcibackd.confspace.header import HEADERS
from pcibackd.wire.pciregs import (CAPABILITY_LIST, EXT_CAP_START, HEADER_END, HEADER_TYPE,
                                        HEADER_TYPE_MASK, STATUS, STATUS_CAP_LIST)
from pcibackd.confspace.policy import DevicePolicy
from pcibackd.confspace.spec import ACCESS_SIZES, FULL, BuildView, Reg, Slot

LEGACY_END = EXT_CAP_START
_MAX_CAPS = 48                 # (256 - 64) / 4: more means a loop or garbage
_MAX_EXT_CAPS = (4096 - 256) // 4
EXT_NEXT_MASK = 0xFFF00000

_UNOWNED = {s: Reg(0, s, "unowned", strict=False) for s in ACCESS_SIZES}


class UnsupportedDevice(ValueError):
    """The function cannot be virtualized (unknown header type or config size)."""


def _zero(b: BuildView, slot: Slot) -> int:
    return 0


def _ext_next(b: BuildView, slot: Slot) -> int:
    return b.next_ext(slot.base) << 20


def _ext_null_head(b: BuildView, slot: Slot) -> int:
    return b.next_ext(slot.base) << 20        # ID 0, version 0: only the link survives


def _hidden(reg: Reg) -> Reg:
    return Reg(reg.offset, reg.size, f"{reg.name}(hidden)", emu=FULL[reg.size], init=_zero)


EXT_HEADER = Reg(0, 4, "ext_cap_header", emu=EXT_NEXT_MASK, init=_ext_next)
EXT_NULL_HEAD = Reg(0, 4, "ext_cap_header(hidden)", emu=0xFFFFFFFF, init=_ext_null_head)
EXT_HIDDEN = Reg(0, 4, "ext_cap_header(hidden)", emu=0xFFFFFFFF, init=_zero)


@dataclass(frozen=True)
class Cap:
    """One entry of a capability list as found on the device."""

    offset: int
    cap_id: int
    extended: bool
    hidden: bool


@dataclass
class Layout:
    """Immutable-by-convention description of one device's guest view."""

    config_size: int
    header_type: int
    owner: list[Slot]                         # per byte
    slots: tuple[Slot, ...]                   # every slot, by offset (including unowned)
    read_masks: dict[int, list[int | None]]   # size -> per-offset emulated-bit mask; None = invalid
    initial: bytes                            # initial emulated bytes (0 outside the masks)
    bars: dict[int, Bar]
    decode_bits: int
    caps: tuple[Cap, ...]
    _cap_index: dict[int, int] = field(default_factory=dict)

    def cap_offset(self, cap_id: int) -> int | None:
        """Offset of the first legacy capability with this ID on the device (hidden or not)."""
        return self._cap_index.get(cap_id)

    def table_slots(self) -> list[Slot]:
        """Slots that come from a table (header, capability, quirk), not gap fill."""
        return [s for s in self.slots if s.reg.name != "unowned"]


def walk_caps(read, config_size: int) -> list[tuple[int, int, bool]]:
    """(offset, id, extended) of the legacy then extended lists, in chain order."""
    out: list[tuple[int, int, bool]] = []
    if read(STATUS, 2) & STATUS_CAP_LIST:
        ptr, seen = read(CAPABILITY_LIST, 1) & 0xFC, set()
        while ptr >= HEADER_END and ptr not in seen and len(seen) < _MAX_CAPS:
            seen.add(ptr)
            hdr = read(ptr, 2)
            if hdr & 0xFF == 0xFF:
                break
            out.append((ptr, hdr & 0xFF, False))
            ptr = (hdr >> 8) & 0xFC
    if config_size > EXT_CAP_START:
        pos, seen = EXT_CAP_START, set()
        while pos >= EXT_CAP_START and pos not in seen and len(seen) < _MAX_EXT_CAPS:
            seen.add(pos)
            hdr = read(pos, 4)
            if hdr in (0, 0xFFFFFFFF):
                break
            out.append((pos, hdr & 0xFFFF, True))
            pos = (hdr >> 20) & 0xFFC
    return out


class Builder:
    """Builds a :class:`Layout` for one device under one policy (see module doc)."""

    def __init__(self, port: HostPort, policy: DevicePolicy) -> None:
        self.port = port
        self.info: DeviceInfo = port.info
        self.policy = policy
        size = self.info.config_size
        if size not in (256, 4096):
            raise UnsupportedDevice(f"config size {size} is neither 256 nor 4096")
        self.config_size = size
        self.header_type = port.read(HEADER_TYPE, 1) & HEADER_TYPE_MASK
        if self.header_type not in HEADERS:
            raise UnsupportedDevice(f"header type {self.header_type} is not 0 or 1")
        self.bars = capture_bars(self.info, self.header_type)
        self.owner: list[Slot | None] = [None] * size
        self.vconfig = bytearray(size)
        self.rmask = bytearray(size)
        found = walk_caps(port.read, size)
        self.caps = tuple(
            Cap(off, cid, ext, cid in (policy.hidden_ext_caps if ext else policy.hidden_caps))
            for off, cid, ext in found)
        legacy = [c.offset for c in self.caps if not c.extended and not c.hidden]
        self.has_caps = bool(legacy)
        if legacy or any(not c.extended for c in self.caps):
            self.first_cap = legacy[0] if legacy else 0
        else:                                     # no list (Cap-List clear): show the byte as is
            self.first_cap = port.read(CAPABILITY_LIST, 1)
        self._next_cap = dict(zip(legacy, legacy[1:] + [0]))
        ext = [c.offset for c in self.caps if c.extended and not c.hidden]
        self._next_ext = dict(zip(ext, ext[1:] + [0]))
        # A hidden cap at 0x100 still heads the list: it becomes a null entry linking on.
        self._next_ext.setdefault(EXT_CAP_START, ext[0] if ext else 0)

    # -- the view hooks see (spec.BuildView) ------------------------------------

    def next_cap(self, offset: int) -> int:
        """The visible legacy capability after the visible one at ``offset`` (0: end)."""
        return self._next_cap[offset]

    def next_ext(self, offset: int) -> int:
        """The visible extended capability after the one at ``offset`` (0: end)."""
        return self._next_ext[offset]

    def bar(self, offset: int) -> Bar:
        """The captured BAR or ROM at ``offset``."""
        return self.bars[offset]

    def hw_read(self, offset: int, size: int) -> int:
        """Read the device."""
        return self.port.read(offset, size)

    def hw_write(self, offset: int, size: int, value: int) -> None:
        """Write the device (setup side effects only)."""
        self.port.write(offset, size, value)

    # -- placement ------------------------------------------------------------

    def place(self, base: int, reg: Reg, limit: int) -> Slot | None:
        """Bind ``reg`` at ``base + reg.offset``; skip it if it leaves the area or overlaps."""
        start = base + reg.offset
        end = start + reg.size
        if end > limit or any(o is not None for o in self.owner[start:end]):
            logger.debug("{}: register {} at {:#x} skipped (overlap or outside)",
                         self.info.bdf, reg.name, start)
            return None
        slot = Slot(start, reg, base)
        value = reg.init(self, slot) if reg.init else self.port.read(start, reg.size)
        value &= reg.emu
        self.vconfig[start:end] = value.to_bytes(reg.size, "little")
        self.rmask[start:end] = (reg.emu | reg.rsvd).to_bytes(reg.size, "little")
        for i in range(start, end):
            self.owner[i] = slot
        return slot

    def _place_caps(self) -> None:
        seen: set[int] = set()
        for cap in self.caps:
            if cap.extended:
                if cap.hidden:
                    head = EXT_NULL_HEAD if cap.offset == EXT_CAP_START else EXT_HIDDEN
                    self.place(cap.offset, head, self.config_size)
                else:
                    self.place(cap.offset, EXT_HEADER, self.config_size)
                continue
            # Like Linux (pci_find_capability, dev->msi_cap): only the first capability with
            # an ID is "the" PM/VPD/MSI/MSI-X; a second one shows its header and nothing more.
            group = None if cap.cap_id in seen else GROUPS.get(cap.cap_id)
            seen.add(cap.cap_id)
            regs_fn = group.regs if group else HEADER_ONLY
            base = cap.offset
            regs = regs_fn(lambda off, size, _b=base: self.port.read(_b + off, size))
            for reg in regs:
                self.place(base, _hidden(reg) if cap.hidden else reg, LEGACY_END)
            if group and group.setup and not cap.hidden:
                group.setup(self, base)

    def _place_quirks(self) -> None:
        for q in self.policy.quirks:
            reg = Reg(0, q.size, f"quirk@{q.offset:#x}", wr=q.mask)
            if self.place(q.offset, reg, self.config_size) is None:
                logger.warning("{}: quirk at {:#x}/{} overlaps a handled register or is outside"
                               " config space; ignored", self.info.bdf, q.offset, q.size)

    def _fill_gaps(self) -> None:
        owner = self.owner
        pos = 0
        while pos < self.config_size:
            if owner[pos] is not None:
                pos += 1
                continue
            for size in (4, 2, 1):
                if pos % size == 0 and all(o is None for o in owner[pos:pos + size]):
                    slot = Slot(pos, _UNOWNED[size], pos)
                    owner[pos:pos + size] = [slot] * size
                    pos += size
                    break

    def build(self) -> Layout:
        header = HEADERS[self.header_type]
        for reg in header:
            self.place(0, reg, HEADER_END)
        self._place_caps()
        self._place_quirks()
        self._fill_gaps()
        owner: list[Slot] = self.owner          # type: ignore[assignment]  # gaps filled
        rmask = bytes(self.rmask)
        read_masks: dict[int, list[int | None]] = {}
        for size in ACCESS_SIZES:
            read_masks[size] = [
                int.from_bytes(rmask[off:off + size], "little") if off % size == 0 else None
                for off in range(self.config_size)]
        slots = tuple(dict.fromkeys(owner))
        cap_index: dict[int, int] = {}
        for cap in self.caps:
            if not cap.extended:
                cap_index.setdefault(cap.cap_id, cap.offset)
        return Layout(self.config_size, self.header_type, owner, slots, read_masks,
                      bytes(self.vconfig), self.bars, decode_bits(self.bars), self.caps, cap_index)


def build_layout(port: HostPort, policy: DevicePolicy) -> Layout:
    """Read the device and build its layout under ``policy``."""
    return Builder(port, policy).build()
