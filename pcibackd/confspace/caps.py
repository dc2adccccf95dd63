"""Capability tables (legacy list): PM, VPD, MSI, MSI-X, and every header.

Rules (pciback-protocol.md §3.5): PME support reads 0 and PME enable is cleared
at init ("PMEs are shared"); PMCSR lets through PME status and data select and
turns the power-state field into a host D-state change; VPD accepts only read
requests (F flag clear); MSI/MSI-X control accepts only enable (and MSI-X
mask-all) and only when interrupt control is allowed, one type at a time.
Message address/data, mask/pending and table/PBA registers are read-only.
Every other capability shows only its 2-byte header to the tables; its body
is unowned space (read-through, writes dropped unless permissive).
"""

from __future__ import annotations

from typing import Callable

from pcibackd.wire.pciif import Err
from pcibackd.wire.pciregs import (
    CAP_MSI, CAP_MSIX, CAP_PM, CAP_VPD, MSI_64BIT, MSI_ENABLE, MSI_EXT_DATA, MSI_FLAGS,
    MSI_MASKABLE, MSIX_ENABLE, MSIX_FLAGS, MSIX_MASKALL, PM_CTRL, PM_PMC, PMC_PME_SUPPORT,
    PMCSR_DATA_SELECT, PMCSR_PME_ENABLE, PMCSR_PME_STATUS, PMCSR_STATE, VPD_ADDR_F)
from pcibackd.confspace.spec import BuildView, CapGroup, HookView, Reg, Slot, WriteHook, static

PMCSR_GUEST = PMCSR_PME_STATUS | PMCSR_DATA_SELECT     # written straight through


# -- cap header ---------------------------------------------------------------

def _next_ptr(b: BuildView, slot: Slot) -> int:
    return b.next_cap(slot.base) << 8       # relinked past hidden capabilities


CAP_HEADER = Reg(0, 2, "cap_header", emu=0xFF00, init=_next_ptr)


# -- power management ---------------------------------------------------------

def _no_pme(b: BuildView, slot: Slot) -> int:
    return 0                                  # the guest is told the device cannot signal PME


def _pm_setup(b: BuildView, base: int) -> None:
    """Clear PME enable in the device (it is shared with dom0), keeping PME status."""
    csr = b.hw_read(base + PM_CTRL, 2)
    if csr & PMCSR_PME_ENABLE:
        b.hw_write(base + PM_CTRL, 2, csr & ~(PMCSR_PME_ENABLE | PMCSR_PME_STATUS))


def pm_ctrl_write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
    """PME status/data select go through; a power-state change goes to the host layer."""
    denied = (new ^ old) & ~(PMCSR_GUEST | PMCSR_STATE)
    if denied:
        cs.note_denied(slot, denied)
    hw = cs.hw_read(slot.offset, 2)
    out = (hw & ~PMCSR_GUEST) | (new & PMCSR_GUEST)
    if (out ^ hw) & ~PMCSR_PME_STATUS or out & PMCSR_PME_STATUS:
        cs.hw_write(slot.offset, 2, out & ~PMCSR_STATE | hw & PMCSR_STATE)
    target = new & PMCSR_STATE
    if target != hw & PMCSR_STATE:
        if not cs.set_power_state(slot.base, target):
            cs.note_denied(slot, PMCSR_STATE)
            return Err.access_denied
    return Err.success


PM = CapGroup(CAP_PM, "pm", static(
    CAP_HEADER,
    Reg(PM_PMC, 2, "pmc", emu=PMC_PME_SUPPORT, init=_no_pme),
    Reg(PM_CTRL, 2, "pmcsr", wr=PMCSR_GUEST | PMCSR_STATE, rw1c=PMCSR_PME_STATUS, rsvd=0x00F4,
        write=pm_ctrl_write),
    Reg(6, 1, "pmcsr_bse"),
    Reg(7, 1, "pm_data"),
), setup=_pm_setup)


# -- vital product data ---------------------------------------------------------

def vpd_addr_write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
    """Read requests (F clear) go to the device; writes to VPD are refused."""
    if new & VPD_ADDR_F:
        cs.note_denied(slot, VPD_ADDR_F)
        return Err.access_denied
    cs.hw_write(slot.offset, 2, new)
    return Err.success


VPD = CapGroup(CAP_VPD, "vpd", static(
    CAP_HEADER,
    Reg(2, 2, "vpd_address", wr=0x7FFF, write=vpd_addr_write),
    Reg(4, 4, "vpd_data"),
))


# -- MSI / MSI-X control --------------------------------------------------------

def _other_enabled(cs: HookView, cap_id: int) -> bool:
    """Is the other message-interrupt type enabled in the device right now?"""
    if cap_id == CAP_MSI:
        base, flags, bit = cs.cap_offset(CAP_MSIX), MSIX_FLAGS, MSIX_ENABLE
    else:
        base, flags, bit = cs.cap_offset(CAP_MSI), MSI_FLAGS, MSI_ENABLE
    return base is not None and bool(cs.hw_read(base + flags, 2) & bit)


def _flags_write(cap_id: int, allowed: int, enable: int) -> WriteHook:
    def write(cs: HookView, slot: Slot, new: int, old: int, written: int) -> int:
        if cs.permissive:
            cs.hw_write(slot.offset, 2, new)
            return Err.success
        hw = cs.hw_read(slot.offset, 2)
        if new == hw:
            return Err.success
        if not cs.allow_interrupt_control or (new ^ hw) & ~allowed:
            cs.note_denied(slot, new ^ hw)
            return Err.access_denied
        # Any value with the enable bit set is refused while the other type is on, as Linux's
        # interrupt-type check does (also when this type is on too: both on is no state to keep).
        if new & enable and _other_enabled(cs, cap_id):
            cs.note_denied(slot, enable)
            return Err.access_denied
        cs.hw_write(slot.offset, 2, new)
        return Err.success
    write.__name__ = f"cap{cap_id:#x}_flags_write"
    return write


msi_flags_write = _flags_write(CAP_MSI, MSI_ENABLE, MSI_ENABLE)
msix_flags_write = _flags_write(CAP_MSIX, MSIX_ENABLE | MSIX_MASKALL, MSIX_ENABLE)


def msi_regs(read: Callable[[int, int], int]) -> tuple[Reg, ...]:
    """MSI registers; their offsets depend on the 64-bit and per-vector-mask flags."""
    flags = read(MSI_FLAGS, 2)
    regs = [CAP_HEADER, Reg(MSI_FLAGS, 2, "msi_flags", wr=MSI_ENABLE, write=msi_flags_write),
            Reg(4, 4, "msi_address_lo")]
    at = 8
    if flags & MSI_64BIT:
        regs.append(Reg(8, 4, "msi_address_hi"))
        at = 12
    regs.append(Reg(at, 2, "msi_data"))
    if flags & (MSI_EXT_DATA | MSI_MASKABLE):
        # Extended data, or the reserved word before the mask register: read-only either way.
        regs.append(Reg(at + 2, 2, "msi_ext_data" if flags & MSI_EXT_DATA else "msi_reserved"))
    if flags & MSI_MASKABLE:
        regs += [Reg(at + 4, 4, "msi_mask"), Reg(at + 8, 4, "msi_pending")]
    return tuple(regs)


MSI = CapGroup(CAP_MSI, "msi", msi_regs)

MSIX = CapGroup(CAP_MSIX, "msix", static(
    CAP_HEADER,
    Reg(MSIX_FLAGS, 2, "msix_flags", wr=MSIX_ENABLE | MSIX_MASKALL, write=msix_flags_write),
    Reg(4, 4, "msix_table"),
    Reg(8, 4, "msix_pba"),
))

GROUPS = {g.cap_id: g for g in (PM, VPD, MSI, MSIX)}
HEADER_ONLY = static(CAP_HEADER)
