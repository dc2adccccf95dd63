"""Type-0 (device) and type-1 (bridge) header tables and their write hooks.

Rules (pciback-protocol.md §3.2-3.4): vendor/device are cached; COMMAND keeps
a virtual copy and lets only the guest bits reach the device (XSA-120);
BARs/ROM are captured and only ever size; cache-line size is written through;
BIST only starts; the interrupt line shows the host IRQ; everything the
kernel backend leaves unregistered is ``strict=False`` (permissive may write
it).  Bridge bus numbers and windows stay read-only even in permissive mode.
"""

from __future__ import annotations

from pcibackd.wire.pciif import Err
from pcibackd.wire.pciregs import (
    BIST_START, COMMAND_DEFINED, COMMAND_FAST_B2B, COMMAND_INTX_DISABLE, COMMAND_IO,
    COMMAND_MASTER, COMMAND_MEM, COMMAND_MWI, COMMAND_SPECIAL, COMMAND_VGA_SNOOP, COMMAND_WAIT,
    STATUS_CAP_LIST, STATUS_RW1C)
from pcibackd.confspace.spec import BuildView, HookView, Reg, Slot

# COMMAND bits the guest owns: kept virtual, reaching hardware as the rules below say.
COMMAND_GUEST = (COMMAND_MASTER | COMMAND_SPECIAL | COMMAND_MWI | COMMAND_VGA_SNOOP
                 | COMMAND_WAIT | COMMAND_FAST_B2B)                          # 0x02BC
COMMAND_EMU = COMMAND_DEFINED & ~COMMAND_GUEST                            # 0x0543
# Guest bits the kernel backend changes in hardware even when not permissive.
COMMAND_HW_STRICT = COMMAND_MASTER | COMMAND_MWI


# -- init hooks ---------------------------------------------------------------

def _vendor(b: BuildView, slot: Slot) -> int:
    return b.info.vendor


def _device(b: BuildView, slot: Slot) -> int:
    return b.info.device


def _bar(b: BuildView, slot: Slot) -> int:
    return b.bar(slot.offset).val


def _irq(b: BuildView, slot: Slot) -> int:
    return b.info.irq & 0xFF            # what pcifront binds as the PIRQ


def _cap_ptr(b: BuildView, slot: Slot) -> int:
    return b.first_cap


def _status(b: BuildView, slot: Slot) -> int:
    return STATUS_CAP_LIST if b.has_caps else 0


# -- write hooks --------------------------------------------------------------

def command_write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
    """Virtual COMMAND; hardware sees only enable, bus master, MWI (and more if allowed)."""
    if new & ~COMMAND_DEFINED:
        cs.note_denied(slot, new & ~COMMAND_DEFINED)
    new &= COMMAND_DEFINED
    permissive = cs.permissive
    if not permissive and (new ^ old) & COMMAND_GUEST & ~COMMAND_HW_STRICT:
        cs.note_denied(slot, (new ^ old) & COMMAND_GUEST & ~COMMAND_HW_STRICT)
    hw = cs.hw_read(slot.offset, 2)
    out = hw
    state = cs.state
    if new & (COMMAND_IO | COMMAND_MEM):
        if not state.enabled:
            # Enabling decodes what the device owns; never a partial or guest-chosen set.
            out |= cs.decode_bits
            state.enabled = True
    elif state.enabled:
        state.enabled = False
        out &= ~COMMAND_MASTER          # disabling only stops DMA: decode stays on (XSA-120)
    out = (out & ~COMMAND_HW_STRICT) | (new & COMMAND_HW_STRICT)
    if cs.allow_interrupt_control:
        out = (out & ~COMMAND_INTX_DISABLE) | (new & COMMAND_INTX_DISABLE)
    if permissive:
        out = (out & ~COMMAND_GUEST) | (new & COMMAND_GUEST)
    if out != hw:
        cs.hw_write(slot.offset, 2, out)
    state.command = new & COMMAND_EMU
    cs.set_emu(slot, state.command)
    return Err.success


def bar_write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
    """All-ones enters sizing; the captured value is accepted (and repaired); all else ignored.

    No value the guest chooses ever reaches a BAR."""
    bar = cs.bar(slot.offset)
    sizing = cs.state.sizing
    if bar.is_sizing(new):
        sizing.add(slot.offset)
        cs.set_emu(slot, bar.size_val)
        return Err.success
    sizing.discard(slot.offset)
    cs.set_emu(slot, bar.val)
    if new != bar.val:
        cs.note_denied(slot, new ^ bar.val)
    elif bar.restorable and cs.hw_read(slot.offset, 4) != bar.val:
        # Linux's "restoration of bar value": only ever the captured address, e.g. after a
        # D3hot->D0 transition lost it; never for a BAR the kernel refused or fixed.
        cs.hw_write(slot.offset, 4, bar.val)
    return Err.success


def bist_write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
    """The guest may only start BIST: other bits must stay as the device has them."""
    hw = cs.hw_read(slot.offset, 1)
    if new == BIST_START or (new & ~BIST_START) == (hw & ~BIST_START):
        if new != hw or new & BIST_START:
            cs.hw_write(slot.offset, 1, new)
    else:
        cs.note_denied(slot, (new ^ hw) & ~BIST_START)
    return Err.success


# -- tables -------------------------------------------------------------------

def _bar_reg(offset: int, name: str) -> Reg:
    return Reg(offset, 4, name, emu=0xFFFFFFFF, wr=0xFFFFFFFF, init=_bar, write=bar_write)


COMMON = (
    Reg(0x00, 2, "vendor_id", emu=0xFFFF, init=_vendor),
    Reg(0x02, 2, "device_id", emu=0xFFFF, init=_device),
    Reg(0x04, 2, "command", emu=COMMAND_EMU, wr=COMMAND_DEFINED, rsvd=0xF800, write=command_write),
    Reg(0x06, 2, "status", emu=STATUS_CAP_LIST, rw1c=STATUS_RW1C, rsvd=0x0006, strict=False,
        init=_status),
    Reg(0x08, 4, "class_revision", strict=False),
    Reg(0x0C, 1, "cache_line_size", wr=0xFF),
    Reg(0x0D, 1, "latency_timer"),
    Reg(0x0E, 1, "header_type", strict=False),
    Reg(0x0F, 1, "bist", wr=BIST_START, write=bist_write),
)

TYPE0 = COMMON + tuple(_bar_reg(0x10 + 4 * i, f"bar{i}") for i in range(6)) + (
    Reg(0x28, 4, "cardbus_cis", strict=False),
    Reg(0x2C, 2, "subsystem_vendor_id", strict=False),
    Reg(0x2E, 2, "subsystem_id", strict=False),
    _bar_reg(0x30, "rom"),
    Reg(0x34, 1, "cap_ptr", emu=0xFF, init=_cap_ptr),
    Reg(0x3C, 1, "interrupt_line", emu=0xFF, init=_irq),
    Reg(0x3D, 1, "interrupt_pin"),
    Reg(0x3E, 1, "min_gnt", strict=False),
    Reg(0x3F, 1, "max_lat", strict=False),
)

TYPE1 = COMMON + (
    _bar_reg(0x10, "bar0"),
    _bar_reg(0x14, "bar1"),
    Reg(0x18, 1, "primary_bus"),
    Reg(0x19, 1, "secondary_bus"),
    Reg(0x1A, 1, "subordinate_bus"),
    Reg(0x1B, 1, "secondary_latency", strict=False),
    Reg(0x1C, 1, "io_base"),
    Reg(0x1D, 1, "io_limit"),
    Reg(0x1E, 2, "secondary_status", rw1c=STATUS_RW1C, strict=False),
    Reg(0x20, 2, "memory_base"),
    Reg(0x22, 2, "memory_limit"),
    Reg(0x24, 2, "prefetch_base"),
    Reg(0x26, 2, "prefetch_limit"),
    Reg(0x28, 4, "prefetch_base_upper"),
    Reg(0x2C, 4, "prefetch_limit_upper"),
    Reg(0x30, 2, "io_base_upper"),
    Reg(0x32, 2, "io_limit_upper"),
    Reg(0x34, 1, "cap_ptr", emu=0xFF, init=_cap_ptr),
    _bar_reg(0x38, "rom"),
    Reg(0x3C, 1, "interrupt_line", emu=0xFF, init=_irq),
    Reg(0x3D, 1, "interrupt_pin"),
    Reg(0x3E, 2, "bridge_control", strict=False),
)

HEADERS = {0: TYPE0, 1: TYPE1}
