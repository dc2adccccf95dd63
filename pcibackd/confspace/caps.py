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

from typing import TYPE_CHECKING, Callable

from pcibackd.wire.pciif import Err
from pcibackd.confspace.power import set_power_state
from pcibackd.confspace.spec import CapGroup, Reg, static

if TYPE_CHECKING:
    from pcibackd.confspace.layout import Builder
    from pcibackd.confspace.space import ConfSpace
    from pcibackd.confspace.spec import Slot

CAP_PM, CAP_VPD, CAP_MSI, CAP_VENDOR, CAP_PCIE, CAP_MSIX = 0x01, 0x03, 0x05, 0x09, 0x10, 0x11

PMC_PME_SUPPORT = 0xF800
PMCSR_STATE = 0x0003
PMCSR_PME_ENABLE = 0x0100
PMCSR_DATA_SELECT = 0x1E00
PMCSR_PME_STATUS = 0x8000
PMCSR_GUEST = PMCSR_PME_STATUS | PMCSR_DATA_SELECT     # written straight through
VPD_F = 0x8000
MSI_ENABLE, MSI_64BIT, MSI_MASKABLE, MSI_EXT_DATA = 0x0001, 0x0080, 0x0100, 0x0200
MSIX_ENABLE, MSIX_MASKALL = 0x8000, 0x4000


# -- cap header ---------------------------------------------------------------

def _next_ptr(b: "Builder", slot: "Slot") -> int:
    return b.next_cap[slot.base] << 8       # relinked past hidden capabilities


CAP_HEADER = Reg(0, 2, "cap_header", emu=0xFF00, init=_next_ptr)


# -- power management ---------------------------------------------------------

def _no_pme(b: "Builder", slot: "Slot") -> int:
    return 0                                  # the guest is told the device cannot signal PME


def _pm_setup(b: "Builder", base: int) -> None:
    """Clear PME enable in the device (it is shared with dom0), keeping PME status."""
    csr = b.port.read(base + 4, 2)
    if csr & PMCSR_PME_ENABLE:
        b.port.write(base + 4, 2, csr & ~(PMCSR_PME_ENABLE | PMCSR_PME_STATUS))


def pm_ctrl_write(cs: "ConfSpace", slot: "Slot", new: int, old: int, written: int) -> int:
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
        pmc = cs.hw_read(slot.base + 2, 2)
        if not set_power_state(cs.port, slot.base, pmc, target):
            cs.note_denied(slot, PMCSR_STATE)
            return Err.access_denied
    return Err.success


PM = CapGroup(CAP_PM, "pm", static(
    CAP_HEADER,
    Reg(2, 2, "pmc", emu=PMC_PME_SUPPORT, init=_no_pme),
    Reg(4, 2, "pmcsr", wr=PMCSR_GUEST | PMCSR_STATE, rw1c=PMCSR_PME_STATUS, rsvd=0x00F4,
        write=pm_ctrl_write),
    Reg(6, 1, "pmcsr_bse"),
    Reg(7, 1, "pm_data"),
), setup=_pm_setup)


# -- vital product data ---------------------------------------------------------

def vpd_addr_write(cs: "ConfSpace", slot: "Slot", new: int, old: int, written: int) -> int:
    """Read requests (F clear) go to the device; writes to VPD are refused."""
    if new & VPD_F:
        cs.note_denied(slot, VPD_F)
        return Err.access_denied
    cs.hw_write(slot.offset, 2, new)
    return Err.success


VPD = CapGroup(CAP_VPD, "vpd", static(
    CAP_HEADER,
    Reg(2, 2, "vpd_address", wr=0x7FFF, write=vpd_addr_write),
    Reg(4, 4, "vpd_data"),
))


# -- MSI / MSI-X control --------------------------------------------------------

def _other_enabled(cs: "ConfSpace", cap_id: int) -> bool:
    """Is the other message-interrupt type enabled in the device right now?"""
    if cap_id == CAP_MSI:
        base, bit = cs.layout.cap_offset(CAP_MSIX), MSIX_ENABLE
    else:
        base, bit = cs.layout.cap_offset(CAP_MSI), MSI_ENABLE
    return base is not None and bool(cs.hw_read(base + 2, 2) & bit)


def _flags_write(cap_id: int, allowed: int, enable: int) -> Callable[..., int]:
    def write(cs: "ConfSpace", slot: "Slot", new: int, old: int, written: int) -> int:
        if cs.permissive:
            cs.hw_write(slot.offset, 2, new)
            return Err.success
        hw = cs.hw_read(slot.offset, 2)
        if new == hw:
            return Err.success
        if not cs.allow_interrupt_control or (new ^ hw) & ~allowed:
            cs.note_denied(slot, new ^ hw)
            return Err.access_denied
        if new & enable and not hw & enable and _other_enabled(cs, cap_id):
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
    flags = read(2, 2)
    regs = [CAP_HEADER, Reg(2, 2, "msi_flags", wr=MSI_ENABLE, write=msi_flags_write),
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
    Reg(2, 2, "msix_flags", wr=MSIX_ENABLE | MSIX_MASKALL, write=msix_flags_write),
    Reg(4, 4, "msix_table"),
    Reg(8, 4, "msix_pba"),
))

GROUPS = {g.cap_id: g for g in (PM, VPD, MSI, MSIX)}
HEADER_ONLY = static(CAP_HEADER)

# Names accepted by the policy file for hide lists.
CAP_NAMES = {
    "pm": CAP_PM, "agp": 0x02, "vpd": CAP_VPD, "slotid": 0x04, "msi": CAP_MSI, "chswp": 0x06,
    "pcix": 0x07, "ht": 0x08, "vendor": CAP_VENDOR, "dbg": 0x0A, "ccrc": 0x0B, "shpc": 0x0C,
    "ssvid": 0x0D, "agp3": 0x0E, "secdev": 0x0F, "pcie": CAP_PCIE, "msix": CAP_MSIX,
    "sata": 0x12, "af": 0x13, "ea": 0x14,
}
EXT_CAP_NAMES = {
    "aer": 0x01, "vc": 0x02, "dsn": 0x03, "pwr": 0x04, "rclink": 0x05, "vc9": 0x09, "vsec": 0x0B,
    "acs": 0x0D, "ari": 0x0E, "ats": 0x0F, "sriov": 0x10, "mriov": 0x11, "mcast": 0x12,
    "pri": 0x13, "rebar": 0x15, "dpa": 0x16, "tph": 0x17, "ltr": 0x18, "secpcie": 0x19,
    "pasid": 0x1B, "dpc": 0x1D, "l1ss": 0x1E, "ptm": 0x1F, "dvsec": 0x23, "dlf": 0x25,
    "pl16": 0x26,
}
