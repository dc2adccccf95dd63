"""Register descriptors, and the views of a device their hooks are given.

A :class:`Reg` describes one register of a group (the header or one
capability) by bit masks, in the style of QEMU's XenPTRegInfo and Xen vPCI:

- ``emu``   bits served from the emulated copy, never from the device;
- ``wr``    bits the guest may change (in the device, or in the emulated copy
            for bits that are also ``emu``); every other bit is read-only;
- ``rw1c``  device bits that clear when written with 1, so a read-modify-write
            never clears them by accident;
- ``rsvd``  reserved bits: read as 0, never written;
- ``strict`` False marks a register that xen-pciback does not handle: in
            permissive mode its non-emulated bits are written through.

``init`` computes the initial emulated value (default: the device's value) and
``write`` replaces the generic masked write with a hook.  A :class:`CapGroup`
lists the registers of one capability, possibly depending on the device.

Hooks never see the engine.  As Linux's config-field handlers get the device
and the field, a write hook gets a :class:`HookView` of the device as a guest
rule may use it, and an init or setup hook a :class:`BuildView` of the device
being captured; ``ConfSpace`` and ``Builder`` satisfy these protocols.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pcibackd.hostpci.port import DeviceInfo
from pcibackd.confspace.bars import Bar
from pcibackd.confspace.state import EmuState


class HookView(Protocol):
    """What a write hook may use: the run-time knobs, the guest state and the device."""

    @property
    def permissive(self) -> bool: ...
    @property
    def allow_interrupt_control(self) -> bool: ...
    @property
    def state(self) -> EmuState: ...
    @property
    def decode_bits(self) -> int:
        """COMMAND bits that enabling the device turns on (what its BARs decode)."""
    def bar(self, offset: int) -> Bar:
        """The captured BAR or ROM at ``offset``."""
    def cap_offset(self, cap_id: int) -> int | None:
        """Offset of the first legacy capability ``cap_id`` on the device (hidden or not)."""
    def hw_read(self, offset: int, size: int) -> int:
        """Read the device."""
    def hw_write(self, offset: int, size: int, value: int) -> None:
        """Write the device, once the hook has applied its rule."""
    def set_emu(self, slot: Slot, value: int) -> None:
        """Store ``value``'s emulated bits as the register's emulated copy."""
    def note_denied(self, slot: Slot, bits: int) -> None:
        """Record that ``bits`` of the current write were dropped or refused."""
    def set_power_state(self, pm_base: int, target: int) -> bool:
        """Move the device to D-state ``target`` through its PM capability at ``pm_base``."""


class BuildView(Protocol):
    """What an init or setup hook may use while a device is captured."""

    @property
    def info(self) -> DeviceInfo: ...
    @property
    def has_caps(self) -> bool:
        """Whether the guest sees a legacy capability list."""
    @property
    def first_cap(self) -> int:
        """The capability pointer the guest sees."""
    def next_cap(self, offset: int) -> int:
        """The visible legacy capability after the one at ``offset`` (0: end of list)."""
    def next_ext(self, offset: int) -> int:
        """The visible extended capability after the one at ``offset`` (0: end of list)."""
    def bar(self, offset: int) -> Bar:
        """The captured BAR or ROM at ``offset``."""
    def hw_read(self, offset: int, size: int) -> int:
        """Read the device."""
    def hw_write(self, offset: int, size: int, value: int) -> None:
        """Write the device (setup side effects only)."""


# hook(view, slot, new_register_value, old_register_value, written_bit_mask) -> XEN_PCI_ERR_*
WriteHook = Callable[[HookView, "Slot", int, int, int], int]
# init(view, slot) -> initial emulated value of the register
InitHook = Callable[[BuildView, "Slot"], int]
# regs(read_rel) -> registers of a capability; read_rel(offset_in_cap, size) reads the device
RegsFn = Callable[[Callable[[int, int], int]], Sequence["Reg"]]
# setup(view, cap_offset): side effects at build time (e.g. clear PME enable)
SetupFn = Callable[[BuildView, int], None]

ACCESS_SIZES = (1, 2, 4)
FULL = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


@dataclass(frozen=True)
class Reg:
    """One register: offset inside its group, size and the masks described above."""

    offset: int
    size: int
    name: str
    emu: int = 0
    wr: int = 0
    rw1c: int = 0
    rsvd: int = 0
    strict: bool = True
    init: InitHook | None = field(default=None, compare=False)
    write: WriteHook | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.size not in ACCESS_SIZES:
            raise ValueError(f"{self.name}: size {self.size} not in {ACCESS_SIZES}")
        if self.offset < 0 or self.offset % self.size:
            raise ValueError(f"{self.name}: offset {self.offset:#x} not aligned to {self.size}")
        full = FULL[self.size]
        for mask_name in ("emu", "wr", "rw1c", "rsvd"):
            mask = getattr(self, mask_name)
            if mask & ~full:
                raise ValueError(f"{self.name}: {mask_name} {mask:#x} exceeds {self.size} bytes")
        if self.rsvd & (self.emu | self.wr | self.rw1c):
            raise ValueError(f"{self.name}: reserved bits overlap emu/wr/rw1c")
        if self.rw1c & self.emu:
            raise ValueError(f"{self.name}: rw1c bits cannot be emulated")

    @property
    def ro(self) -> int:
        """Bits the guest cannot change (neither writable nor reserved)."""
        return FULL[self.size] & ~self.wr & ~self.rsvd


@dataclass(frozen=True)
class CapGroup:
    """The registers of one capability (legacy list), keyed by capability ID."""

    cap_id: int
    name: str
    regs: RegsFn
    setup: SetupFn | None = None


@dataclass(frozen=True, eq=False)
class Slot:
    """A register bound to its absolute offset in one device's config space.

    The mask fields are derived once so the dispatcher does no per-access work.
    """

    offset: int
    reg: Reg
    base: int                      # start of the group (0 for the header)
    size: int = field(init=False)
    wr_hw: int = field(init=False)     # guest bits that reach the device
    wr_emu: int = field(init=False)    # guest bits kept in the emulated copy
    passable: int = field(init=False)  # bits permissive mode writes through (non-strict regs)

    def __post_init__(self) -> None:
        reg = self.reg
        object.__setattr__(self, "size", reg.size)
        object.__setattr__(self, "wr_hw", reg.wr & ~reg.emu)
        object.__setattr__(self, "wr_emu", reg.wr & reg.emu)
        passable = 0 if reg.strict else FULL[reg.size] & ~reg.emu & ~reg.rsvd
        object.__setattr__(self, "passable", passable)

    @property
    def end(self) -> int:
        return self.offset + self.reg.size

    def __repr__(self) -> str:
        return f"Slot({self.reg.name}@{self.offset:#x}/{self.reg.size})"


def static(*regs: Reg) -> RegsFn:
    """A RegsFn for a capability whose layout does not depend on the device."""
    table = tuple(regs)
    return lambda _read: table
