"""Register tables of the simulated hardware: which bits software may change.

Written in the vocabulary of :mod:`.hwspec`; compiled by :mod:`.hwmodel`.
Sources (section numbers of the public specifications):

* PCI Local Bus 3.0 §6.2 (type-0 header, Command §6.2.2, Status §6.2.3,
  BIST §6.2.4, BARs/ROM §6.2.5), §6.7 (capability list), §6.8.1 (MSI),
  §6.8.2 (MSI-X), Appendix I / §6.4 (VPD).
* PCI-to-PCI Bridge Architecture 1.2 §3.2 (type-1 header: bus numbers,
  windows, secondary status, bridge control).
* PCI Bus Power Management Interface 1.2 §3.2 (PMC, PMCSR).
* PCI Express Base 4.0 §7.5.3 (PCI Express capability), §7.8.4 (AER),
  §7.7.7 (ACS), §7.8.7 (ARI), §9.3.3 (SR-IOV), §6.6.2 (Function Level Reset).
* PCI Advanced Features capability ECN (conventional-PCI FLR).

The reset methods a function offers (:data:`RESET_METHODS`) are facts of the
same specifications, evaluated on the function's config bytes.

Simplifications (hardware may hard-wire more bits than this): command bits are
the conventional-PCI set for every function; the I/O window and I/O BAR
address bits are always 32 bits wide; no Data_Select for PM; SR-IOV NumVFs and
VF BARs stay writable while VF Enable is set.
"""

from __future__ import annotations

from typing import Callable

from pcibackd.wire.pciregs import (
    BASE_ADDRESS_0, BIST_CAPABLE, BIST_START, CAP_MSI, CAP_MSIX, CAP_PCIE, CAP_PM, CAP_VENDOR,
    CAP_VPD, COMMAND, COMMAND_DEFINED, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEM, D1, D2, EXT_CAP_ACS, EXT_CAP_AER, EXT_CAP_ARI, EXT_CAP_DSN,
    EXT_CAP_SRIOV, EXT_CAP_VSEC, HEADER_TYPE, HEADER_TYPE_MASK, MSI_64BIT, MSI_FLAGS,
    MSI_MASKABLE, MSIX_ENABLE, MSIX_FLAGS, MSIX_MASKALL, PM_CTRL, PM_PMC, PMC_D1, PMC_D2,
    PMCSR_PME_ENABLE, PMCSR_PME_STATUS, PMCSR_STATE, ROM_ADDRESS_MASK, ROM_ENABLE, STATUS_RW1C)
from simdom0.hwspec import U16, U32, ROM_MIN, Ctx, HwReg, bar_layout, bar_rule, pow2_at_least

# Bridge control (PCI-PCI bridge 1.2 §3.2.5.18): bits 0-9 and 11 RW,
# bit 10 (discard timer status) RW1C, 15:12 reserved.
BRIDGE_CONTROL_RW = 0x0BFF
BRIDGE_CONTROL_RW1C = 0x0400


# --- header tables ------------------------------------------------------------

def _header_bars(ctx: Ctx) -> list[tuple[int, int | None]]:
    count = 6 if ctx.cfg[HEADER_TYPE] & HEADER_TYPE_MASK == 0 else 2
    if ctx.virtfn:
        return [(0, 0)] * count     # a VF's BARs are read-only zero: its PF's VF BARs place it
    return bar_layout(ctx, BASE_ADDRESS_0, count, 0)


def _bar_regs(first: int, count: int) -> tuple[HwReg, ...]:
    regs = []
    for i in range(count):
        rw, init = bar_rule(_header_bars, i)
        regs.append(HwReg(f"bar{i}", first + 4 * i, 4, rw=rw, init=init))
    return tuple(regs)


def _rom_size(ctx: Ctx) -> int:
    return pow2_at_least(ctx.resource_size(6), ROM_MIN)


def _rom_rw(ctx: Ctx) -> int:
    size = _rom_size(ctx)
    return (~(size - 1) & ROM_ADDRESS_MASK & U32) | ROM_ENABLE if size else 0


def _rom_init(ctx: Ctx) -> int | None:
    return None if _rom_size(ctx) else 0


def _bist_capable(ctx: Ctx) -> bool:
    return bool(ctx.cfg[0x0F] & BIST_CAPABLE)


def _bridge_pref64(ctx: Ctx) -> bool:
    return ctx.cfg[0x24] & 0xF == 0x1      # prefetchable window decodes 64 bits


def _bridge_io32(ctx: Ctx) -> bool:
    return ctx.cfg[0x1C] & 0xF == 0x1      # I/O window decodes 32 bits


# A VF's I/O and Memory Space Enable are RsvdP, read as zero (PCIe 4.0 §9.3.4.1.3): its
# memory decoding is the PF's (VF MSE in the SR-IOV control), not its own COMMAND's.
# Interrupt Disable reads zero too: a VF has no INTx.
VF_COMMAND_ZERO = COMMAND_IO | COMMAND_MEM | COMMAND_INTX_DISABLE


def _command_rw(ctx: Ctx) -> int:
    return COMMAND_DEFINED & ~VF_COMMAND_ZERO if ctx.virtfn else COMMAND_DEFINED


def _command_init(ctx: Ctx) -> int | None:
    return int.from_bytes(ctx.cfg[COMMAND:COMMAND + 2], "little") & ~VF_COMMAND_ZERO if ctx.virtfn else None


HEADER_COMMON = (   # PCI LB 3.0 §6.2.2-§6.2.4
    HwReg("command", 0x04, 2, rw=_command_rw, init=_command_init),
    HwReg("status", 0x06, 2, rw1c=STATUS_RW1C),
    HwReg("cache_line_size", 0x0C, 1, rw=0xFF),
    HwReg("latency_timer", 0x0D, 1, rw=0xFF),
    HwReg("bist", 0x0F, 1, rw=BIST_START, when=_bist_capable),
    HwReg("interrupt_line", 0x3C, 1, rw=0xFF),
)

HEADER_TYPE0 = (   # PCI LB 3.0 §6.2.5
    *_bar_regs(0x10, 6),
    HwReg("rom", 0x30, 4, rw=_rom_rw, init=_rom_init),
)

HEADER_TYPE1 = (   # PCI-to-PCI Bridge 1.2 §3.2.5
    *_bar_regs(0x10, 2),
    HwReg("primary_bus", 0x18, 1, rw=0xFF),
    HwReg("secondary_bus", 0x19, 1, rw=0xFF),
    HwReg("subordinate_bus", 0x1A, 1, rw=0xFF),
    HwReg("secondary_latency", 0x1B, 1, rw=0xFF),
    HwReg("io_base", 0x1C, 1, rw=0xF0),                 # 3:0 = addressing capability
    HwReg("io_limit", 0x1D, 1, rw=0xF0),
    HwReg("secondary_status", 0x1E, 2, rw1c=STATUS_RW1C),
    HwReg("memory_base", 0x20, 2, rw=0xFFF0),
    HwReg("memory_limit", 0x22, 2, rw=0xFFF0),
    HwReg("pref_base", 0x24, 2, rw=0xFFF0),             # 3:0 = 32/64-bit capability
    HwReg("pref_limit", 0x26, 2, rw=0xFFF0),
    HwReg("pref_base_upper", 0x28, 4, rw=U32, when=_bridge_pref64),
    HwReg("pref_limit_upper", 0x2C, 4, rw=U32, when=_bridge_pref64),
    HwReg("io_base_upper", 0x30, 2, rw=U16, when=_bridge_io32),
    HwReg("io_limit_upper", 0x32, 2, rw=U16, when=_bridge_io32),
    HwReg("rom", 0x38, 4, rw=_rom_rw, init=_rom_init),
    HwReg("bridge_control", 0x3E, 2, rw=BRIDGE_CONTROL_RW, rw1c=BRIDGE_CONTROL_RW1C),
)

HEADER_TABLES = {0: HEADER_TYPE0, 1: HEADER_TYPE1, 2: ()}   # CardBus: common registers only


# --- legacy capabilities ------------------------------------------------------

CAP_AF = 0x13                     # Advanced Features (PCI AF ECN)

# PM (PCI PM 1.2 §3.2.4): PowerState 1:0 RW (unsupported states discarded by a
# hook), PME_En (8) RW, PME_Status (15) RW1C; No_Soft_Reset, Data_Scale RO.
PM_REGS = (
    HwReg("pmcsr", PM_CTRL, 2, rw=PMCSR_STATE | PMCSR_PME_ENABLE, rw1c=PMCSR_PME_STATUS,
          hook="pm_power_state"),
)

# PMC bit that must be set for a power state to be accepted (D0 and D3hot are mandatory).
PM_STATE_SUPPORT_BIT = {0: 0, D1: PMC_D1, D2: PMC_D2, 3: 0}

VPD_REGS = (   # PCI LB 3.0 Appendix I: address 14:0 plus the F flag (15), then data
    HwReg("vpd_address", 0x02, 2, rw=U16),
    HwReg("vpd_data", 0x04, 4, rw=U32),
)


def _msi64(ctx: Ctx) -> bool:
    return bool(ctx.u16(MSI_FLAGS) & MSI_64BIT)


def _msi_layout(is64: bool, maskable: bool) -> Callable[[Ctx], bool]:
    return lambda ctx: _msi64(ctx) == is64 and bool(ctx.u16(MSI_FLAGS) & MSI_MASKABLE) == maskable


def _msi_mask_rw(ctx: Ctx) -> int:
    # Only the mask bits of vectors the function can request are implemented.
    vectors = 1 << min((ctx.u16(MSI_FLAGS) >> 1) & 0x7, 5)
    return (1 << vectors) - 1


MSI_REGS = (   # PCI LB 3.0 §6.8.1: Enable (0) and Multiple Message Enable (6:4) RW
    HwReg("msi_control", MSI_FLAGS, 2, rw=0x0071),
    HwReg("msi_address", 0x04, 4, rw=0xFFFF_FFFC),
    HwReg("msi_address_upper", 0x08, 4, rw=U32, when=_msi64),
    HwReg("msi_data", 0x08, 2, rw=U16, when=lambda ctx: not _msi64(ctx)),
    HwReg("msi_data", 0x0C, 2, rw=U16, when=_msi64),
    HwReg("msi_mask", 0x0C, 4, rw=_msi_mask_rw, when=_msi_layout(False, True)),
    HwReg("msi_mask", 0x10, 4, rw=_msi_mask_rw, when=_msi_layout(True, True)),
)

MSIX_REGS = (  # PCI LB 3.0 §6.8.2: MSI-X Enable (15) and Function Mask (14)
    HwReg("msix_control", MSIX_FLAGS, 2, rw=MSIX_ENABLE | MSIX_MASKALL),
)

# PCI Express capability (PCIe Base 4.0 §7.5.3).  Device/port type, bits 7:4 of
# the PCIe Capabilities register:
PCIE_ROOT_PORT, PCIE_DOWNSTREAM, PCIE_PCIE_TO_PCI, PCIE_PCI_TO_PCIE = 0x4, 0x6, 0x7, 0x8
PCIE_RCIEP, PCIE_RCEC = 0x9, 0xA
PCIE_DOWNSTREAM_FACING = {PCIE_ROOT_PORT, PCIE_DOWNSTREAM, PCIE_PCI_TO_PCIE}
PCIE_NO_LINK = {PCIE_RCIEP, PCIE_RCEC}
PCIE_ROOT_REGS = {PCIE_ROOT_PORT, PCIE_RCEC}
PCIE_SLOT_IMPLEMENTED = 0x0100
PCIE_FLAGS = 2                # the PCIe Capabilities register

# ASPM 1:0, RCB 3, common clock 6, ext synch 7, clock PM 8, HW width disable 9
LNKCTL_COMMON_RW = 0x03CB
LNKCTL_PORT_RW = 0x0C10       # link disable 4, BW mgmt int 10, autonomous BW int 11
LNKSTA_PORT_RW1C = 0xC000     # link BW management status 14, autonomous BW status 15


def _pcie_type(ctx: Ctx) -> int:
    return (ctx.u16(PCIE_FLAGS) >> 4) & 0xF


def _pcie_slot(ctx: Ctx) -> bool:
    return bool(ctx.u16(PCIE_FLAGS) & PCIE_SLOT_IMPLEMENTED)


def _devctl_rw(ctx: Ctx) -> int:
    # Bit 15 is "Bridge Configuration Retry Enable" (RW) on PCIe-to-PCI bridges and
    # "Initiate FLR" elsewhere, which always reads 0.
    return U16 if _pcie_type(ctx) == PCIE_PCIE_TO_PCI else 0x7FFF


def _lnkctl_rw(ctx: Ctx) -> int:
    return LNKCTL_COMMON_RW | (LNKCTL_PORT_RW if _pcie_type(ctx) in PCIE_DOWNSTREAM_FACING else 0)


PCIE_REGS = (
    HwReg("devctl", 0x08, 2, rw=_devctl_rw),
    HwReg("devsta", 0x0A, 2, rw1c=0x000F),               # CED, NFED, FED, URD
    HwReg("lnkctl", 0x10, 2, rw=_lnkctl_rw,
          when=lambda ctx: _pcie_type(ctx) not in PCIE_NO_LINK),
    HwReg("lnksta", 0x12, 2, rw1c=LNKSTA_PORT_RW1C,
          when=lambda ctx: _pcie_type(ctx) in PCIE_DOWNSTREAM_FACING),
    HwReg("sltctl", 0x18, 2, rw=0x1FFF, when=_pcie_slot),
    HwReg("sltsta", 0x1A, 2, rw1c=0x011F, when=_pcie_slot),
    HwReg("rootctl", 0x1C, 2, rw=0x001F, when=lambda ctx: _pcie_type(ctx) in PCIE_ROOT_REGS),
    HwReg("rootsta", 0x20, 4, rw1c=0x0001_0000,
          when=lambda ctx: _pcie_type(ctx) in PCIE_ROOT_REGS),
    HwReg("devctl2", 0x28, 2, rw=0xF7FF, when=lambda ctx: (ctx.u16(PCIE_FLAGS) & 0xF) >= 2),
    # target speed 3:0, enter compliance 4, HW autonomous speed disable 5, margin 9:7,
    # modified compliance 10, compliance SOS 11, de-emphasis 15:12 (6 is RO)
    HwReg("lnkctl2", 0x30, 2, rw=0xFFBF,
          when=lambda ctx: (ctx.u16(PCIE_FLAGS) & 0xF) >= 2 and _pcie_type(ctx) not in PCIE_NO_LINK),
)

LEGACY_CAPS: dict[int, tuple[str, tuple[HwReg, ...]]] = {
    CAP_AF: ("af", ()),                  # Initiate FLR reads 0: nothing to keep
    CAP_PM: ("pm", PM_REGS),
    CAP_VPD: ("vpd", VPD_REGS),
    CAP_MSI: ("msi", MSI_REGS),
    CAP_VENDOR: ("vendor", ()),          # vendor-specific: read-only
    CAP_PCIE: ("pcie", PCIE_REGS),
    CAP_MSIX: ("msix", MSIX_REGS),
}


# --- extended capabilities ------------------------------------------------------

AER_UNCOR_BITS = 0x07FF_F030   # PCIe 4.0 §7.8.4.2: bits 4, 5, 12-26
AER_COR_BITS = 0x0000_F1C1     # §7.8.4.5: bits 0, 6, 7, 8, 12-15


def _aer_control_rw(ctx: Ctx) -> int:
    # ECRC generation/check and multiple-header enables are RW only when capable.
    cap = ctx.u32(0x18)
    return ((cap >> 5) & 1) << 6 | ((cap >> 7) & 1) << 8 | ((cap >> 9) & 1) << 10


def _pcie_port_is_root(ctx: Ctx) -> bool:
    return (ctx.pcie is not None
            and ((ctx.at16(ctx.pcie + PCIE_FLAGS) >> 4) & 0xF) in PCIE_ROOT_REGS)


AER_REGS = (
    HwReg("uncor_status", 0x04, 4, rw1c=AER_UNCOR_BITS),
    HwReg("uncor_mask", 0x08, 4, rw=AER_UNCOR_BITS),
    HwReg("uncor_severity", 0x0C, 4, rw=AER_UNCOR_BITS),
    HwReg("cor_status", 0x10, 4, rw1c=AER_COR_BITS),
    HwReg("cor_mask", 0x14, 4, rw=AER_COR_BITS),
    HwReg("aer_control", 0x18, 4, rw=_aer_control_rw),
    HwReg("root_err_command", 0x2C, 4, rw=0x7, when=_pcie_port_is_root),
    HwReg("root_err_status", 0x30, 4, rw1c=0x7F, when=_pcie_port_is_root),
)

ACS_REGS = (   # §7.7.7: a control bit is RW when its capability bit (same position) is set
    HwReg("acs_control", 0x06, 2, rw=lambda ctx: ctx.u16(4) & 0x7F),
)

ARI_REGS = (   # §7.8.7: MFVC/ACS function-group enables and the function group
    HwReg("ari_control", 0x06, 2, rw=0x0073),
)

SRIOV_FIRST_VF_BAR = 0x24
SRIOV_RESOURCE_INDEX = 7      # sysfs resource lines 7..12 are the VF BARs (total over TotalVFs)


def _vf_bars(ctx: Ctx) -> list[tuple[int, int | None]]:
    total_vfs = ctx.u16(0x0E)
    return bar_layout(ctx, ctx.base + SRIOV_FIRST_VF_BAR, 6, SRIOV_RESOURCE_INDEX, total_vfs)


def _vf_bar_reg(i: int) -> HwReg:
    rw, init = bar_rule(_vf_bars, i)
    return HwReg(f"vf_bar{i}", SRIOV_FIRST_VF_BAR + 4 * i, 4, rw=rw, init=init)


SRIOV_REGS = (   # §9.3.3
    HwReg("sriov_control", 0x08, 2, rw=0x001F),      # VF enable, migration, MSE, ARI hierarchy
    HwReg("sriov_status", 0x0A, 2, rw1c=0x0001),
    HwReg("num_vfs", 0x10, 2, rw=U16),
    HwReg("system_page_size", 0x20, 4, rw=U32),
    *(_vf_bar_reg(i) for i in range(6)),
)

EXTENDED_CAPS: dict[int, tuple[str, tuple[HwReg, ...]]] = {
    EXT_CAP_AER: ("aer", AER_REGS),
    EXT_CAP_DSN: ("dsn", ()),
    EXT_CAP_VSEC: ("vsec", ()),
    EXT_CAP_ACS: ("acs", ACS_REGS),
    EXT_CAP_ARI: ("ari", ARI_REGS),
    EXT_CAP_SRIOV: ("sriov", SRIOV_REGS),
}


# --- reset methods ---------------------------------------------------------------

PCIE_DEVCAP_FLR = 1 << 28         # PCIe 4.0 §7.5.3.3: Function Level Reset Capability
AF_TP_FLR = 0x03                  # AF capabilities byte (cap + 3): TP (0) and FLR (1) capable
PM_NO_SOFT_RESET = 0x0008         # PM 1.2 §3.2.4: D3hot -> D0 keeps the function's state


def _cap_at(cfg: bytes, caps, cap_id: int) -> int | None:
    return next((c.offset for c in caps if c.kind == "legacy" and c.cap_id == cap_id), None)


def _u(cfg: bytes, offset: int, size: int) -> int:
    return int.from_bytes(cfg[offset:offset + size], "little")


def _has_flr(cfg: bytes, caps, alone: bool) -> bool:
    pcie = _cap_at(cfg, caps, CAP_PCIE)
    return pcie is not None and bool(_u(cfg, pcie + 4, 4) & PCIE_DEVCAP_FLR)


def _has_af_flr(cfg: bytes, caps, alone: bool) -> bool:
    af = _cap_at(cfg, caps, CAP_AF)
    return af is not None and cfg[af + 3] & AF_TP_FLR == AF_TP_FLR


def _has_pm_reset(cfg: bytes, caps, alone: bool) -> bool:
    pm = _cap_at(cfg, caps, CAP_PM)
    return pm is not None and not _u(cfg, pm + PM_CTRL, 2) & PM_NO_SOFT_RESET


def _has_bus_reset(cfg: bytes, caps, alone: bool) -> bool:
    # a secondary bus reset (bridge control bit 6) resets everything below the bridge
    return alone and cfg[HEADER_TYPE] & HEADER_TYPE_MASK == 0


# (kernel's name, whether the function has it from (config, capabilities, alone on its bus)),
# in the order the kernel prefers them
RESET_METHODS: tuple[tuple[str, Callable[[bytes, list, bool], bool]], ...] = (
    ("flr", _has_flr),
    ("af_flr", _has_af_flr),
    ("pm", _has_pm_reset),
    ("bus", _has_bus_reset),
)


# --- value-dependent hooks ------------------------------------------------------

def _pm_power_state(old: bytes, new: bytearray, pmcsr: int) -> None:
    """An unsupported D-state write completes but the state stays (PM 1.2 §3.2.4)."""
    pmc_at = pmcsr - PM_CTRL + PM_PMC
    pmc = int.from_bytes(old[pmc_at:pmc_at + 2], "little")
    required = PM_STATE_SUPPORT_BIT[new[pmcsr] & PMCSR_STATE]
    if required and not pmc & required:
        new[pmcsr] = (new[pmcsr] & ~PMCSR_STATE) | (old[pmcsr] & PMCSR_STATE)


# (config before the write, config after the masks applied, offset of the hooked register)
HOOKS: dict[str, Callable[[bytes, bytearray, int], None]] = {
    "pm_power_state": _pm_power_state,
}
