"""Spec-based model of which config-space bits hardware lets software change.

The model is a set of register tables.  Compiling them against one device's
config bytes and sysfs resources gives two byte masks: ``rw`` (a write
replaces the bit) and ``rw1c`` (writing 1 clears the bit).  Every other bit is
read-only.  A few registers also need a hook for a value-dependent rule.

Sources (section numbers of the public specifications):

* PCI Local Bus 3.0 §6.2 (type-0 header, Command §6.2.2, Status §6.2.3,
  BIST §6.2.4, BARs/ROM §6.2.5), §6.7 (capability list), §6.8.1 (MSI),
  §6.8.2 (MSI-X), Appendix I / §6.4 (VPD).
* PCI-to-PCI Bridge Architecture 1.2 §3.2 (type-1 header: bus numbers,
  windows, secondary status, bridge control).
* PCI Bus Power Management Interface 1.2 §3.2 (PMC, PMCSR).
* PCI Express Base 4.0 §7.5.3 (PCI Express capability), §7.8.4 (AER),
  §7.7.7 (ACS), §7.8.7 (ARI), §9.3.3 (SR-IOV).

Simplifications (hardware may hard-wire more bits than this): command bits are
the conventional-PCI set for every function; the I/O window and I/O BAR
address bits are always 32 bits wide; no Data_Select for PM; SR-IOV NumVFs and
VF BARs stay writable while VF Enable is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pcibackd.hostpci.port import Resource

U16 = 0xFFFF
U32 = 0xFFFF_FFFF

# --- type-0/1 header constants ---------------------------------------------

# Command register bits (PCI LB 3.0 §6.2.2); bits 15:11 are reserved (read 0).
COMMAND_BITS = {
    "IO": 0x0001, "MEMORY": 0x0002, "MASTER": 0x0004, "SPECIAL": 0x0008,
    "INVALIDATE": 0x0010, "VGA_PALETTE": 0x0020, "PARITY": 0x0040, "WAIT": 0x0080,
    "SERR": 0x0100, "FAST_BACK": 0x0200, "INTX_DISABLE": 0x0400,
}
COMMAND_RW = sum(COMMAND_BITS.values())

# Status error bits (PCI LB 3.0 §6.2.3): master data parity error (8), signaled
# target abort (11), received target/master abort (12, 13), signaled system
# error (14), detected parity error (15).  Same layout for a bridge's secondary status.
STATUS_RW1C = 0xF900
STATUS_CAP_LIST = 0x0010

BIST_CAPABLE = 0x80
BIST_START = 0x40

# Bridge control (PCI-PCI bridge 1.2 §3.2.5.18): bits 0-9 and 11 RW,
# bit 10 (discard timer status) RW1C, 15:12 reserved.
BRIDGE_CONTROL_RW = 0x0BFF
BRIDGE_CONTROL_RW1C = 0x0400

MEM_BAR_MIN, IO_BAR_MIN, ROM_MIN = 16, 4, 2048
ROM_ADDRESS_MASK = 0xFFFF_F800
ROM_ENABLE = 0x1

CAP_POINTER = {0: 0x34, 1: 0x34, 2: 0x14}   # by header type
EXT_CAP_START = 0x100
MAX_CAPS = 64                                # bounds a looped list


# --- compile-time context ----------------------------------------------------

class Ctx:
    """What a table predicate may look at: the config bytes, the block base, resources."""

    def __init__(self, cfg: bytes, resources: tuple[Resource, ...]) -> None:
        self.cfg = cfg
        self.resources = resources
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
class Reg:
    """One register of a table: offset relative to its block (header or capability)."""

    name: str
    offset: int
    size: int
    rw: Mask = 0
    rw1c: Mask = 0
    when: Callable[[Ctx], bool] | None = None
    init: Callable[[Ctx], int | None] | None = None   # forced power-on value, None = keep dump
    hook: str | None = None                           # name in HOOKS


@dataclass(frozen=True)
class Field:
    """A compiled register at an absolute offset."""

    name: str
    offset: int
    size: int
    rw: int
    rw1c: int


@dataclass(frozen=True)
class Capability:
    kind: str        # "legacy" | "extended"
    cap_id: int
    offset: int
    name: str


# --- BAR sizing (shared by header BARs, the ROM and SR-IOV VF BARs) -----------

def _pow2_at_least(size: int, minimum: int) -> int:
    return max(minimum, 1 << (size - 1).bit_length()) if size else 0


def _type_bits_from_flags(flags: int) -> int:
    if flags & Resource.IORESOURCE_IO:
        return 0x1
    return (0x4 if flags & Resource.IORESOURCE_MEM_64 else 0) | (0x8 if flags & Resource.IORESOURCE_PREFETCH else 0)


def _bar_layout(ctx: Ctx, first: int, count: int, res_index: int, divisor: int = 1) -> list[tuple[int, int | None]]:
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
        res = ctx.resources[res_index + i] if res_index + i < len(ctx.resources) else Resource(0, 0, 0)
        per_bar = res.size // divisor if divisor else 0
        if per_bar == 0:
            out.append((0, 0))
            i += 1
            continue
        type_bits = (raw & 0x3 if raw & 1 else raw & 0xF) if raw else _type_bits_from_flags(res.flags)
        is_io = bool(type_bits & 1)
        size = _pow2_at_least(per_bar, IO_BAR_MIN if is_io else MEM_BAR_MIN)
        low_ro = 0x3 if is_io else 0xF
        out.append((~(size - 1) & ~low_ro & U32, None if raw else type_bits))
        if not is_io and type_bits & 0x6 == 0x4 and i + 1 < count:
            out.append(((~(size - 1) >> 32) & U32, None))
            i += 1
        i += 1
    ctx.memo[key] = out
    return out


def _header_bar(i: int) -> tuple[Callable[[Ctx], int], Callable[[Ctx], int | None]]:
    def layout(ctx: Ctx):
        return _bar_layout(ctx, 0x10, 6 if ctx.cfg[0x0E] & 0x7F == 0 else 2, 0)[i]
    return (lambda ctx: layout(ctx)[0]), (lambda ctx: layout(ctx)[1])


def _rom_size(ctx: Ctx) -> int:
    return _pow2_at_least(ctx.resource_size(6), ROM_MIN)


def _rom_rw(ctx: Ctx) -> int:
    size = _rom_size(ctx)
    return (~(size - 1) & ROM_ADDRESS_MASK & U32) | ROM_ENABLE if size else 0


def _rom_init(ctx: Ctx) -> int | None:
    return None if _rom_size(ctx) else 0


def _bar_regs(first: int, count: int) -> tuple[Reg, ...]:
    regs = []
    for i in range(count):
        rw, init = _header_bar(i)
        regs.append(Reg(f"bar{i}", first + 4 * i, 4, rw=rw, init=init))
    return tuple(regs)


# --- header tables ------------------------------------------------------------

def _bist_capable(ctx: Ctx) -> bool:
    return bool(ctx.cfg[0x0F] & BIST_CAPABLE)


def _bridge_pref64(ctx: Ctx) -> bool:
    return ctx.cfg[0x24] & 0xF == 0x1      # prefetchable window decodes 64 bits


def _bridge_io32(ctx: Ctx) -> bool:
    return ctx.cfg[0x1C] & 0xF == 0x1      # I/O window decodes 32 bits


HEADER_COMMON = (   # PCI LB 3.0 §6.2.2-§6.2.4
    Reg("command", 0x04, 2, rw=COMMAND_RW),
    Reg("status", 0x06, 2, rw1c=STATUS_RW1C),
    Reg("cache_line_size", 0x0C, 1, rw=0xFF),
    Reg("latency_timer", 0x0D, 1, rw=0xFF),
    Reg("bist", 0x0F, 1, rw=BIST_START, when=_bist_capable),
    Reg("interrupt_line", 0x3C, 1, rw=0xFF),
)

HEADER_TYPE0 = (   # PCI LB 3.0 §6.2.5
    *_bar_regs(0x10, 6),
    Reg("rom", 0x30, 4, rw=_rom_rw, init=_rom_init),
)

HEADER_TYPE1 = (   # PCI-to-PCI Bridge 1.2 §3.2.5
    *_bar_regs(0x10, 2),
    Reg("primary_bus", 0x18, 1, rw=0xFF),
    Reg("secondary_bus", 0x19, 1, rw=0xFF),
    Reg("subordinate_bus", 0x1A, 1, rw=0xFF),
    Reg("secondary_latency", 0x1B, 1, rw=0xFF),
    Reg("io_base", 0x1C, 1, rw=0xF0),                 # 3:0 = addressing capability
    Reg("io_limit", 0x1D, 1, rw=0xF0),
    Reg("secondary_status", 0x1E, 2, rw1c=STATUS_RW1C),
    Reg("memory_base", 0x20, 2, rw=0xFFF0),
    Reg("memory_limit", 0x22, 2, rw=0xFFF0),
    Reg("pref_base", 0x24, 2, rw=0xFFF0),             # 3:0 = 32/64-bit capability
    Reg("pref_limit", 0x26, 2, rw=0xFFF0),
    Reg("pref_base_upper", 0x28, 4, rw=U32, when=_bridge_pref64),
    Reg("pref_limit_upper", 0x2C, 4, rw=U32, when=_bridge_pref64),
    Reg("io_base_upper", 0x30, 2, rw=U16, when=_bridge_io32),
    Reg("io_limit_upper", 0x32, 2, rw=U16, when=_bridge_io32),
    Reg("rom", 0x38, 4, rw=_rom_rw, init=_rom_init),
    Reg("bridge_control", 0x3E, 2, rw=BRIDGE_CONTROL_RW, rw1c=BRIDGE_CONTROL_RW1C),
)

HEADER_TABLES = {0: HEADER_TYPE0, 1: HEADER_TYPE1, 2: ()}   # CardBus: common registers only


# --- legacy capabilities ------------------------------------------------------

# PM (PCI PM 1.2 §3.2.4): PowerState 1:0 RW (unsupported states discarded by a
# hook), PME_En (8) RW, PME_Status (15) RW1C; No_Soft_Reset, Data_Scale RO.
PM_REGS = (
    Reg("pmcsr", 0x04, 2, rw=0x0103, rw1c=0x8000, hook="pm_power_state"),
)

# PMC bit that must be set for a power state to be accepted (D0 and D3hot are mandatory).
PM_STATE_SUPPORT_BIT = {0: 0, 1: 0x0200, 2: 0x0400, 3: 0}

VPD_REGS = (   # PCI LB 3.0 Appendix I: address 14:0 plus the F flag (15), then data
    Reg("vpd_address", 0x02, 2, rw=U16),
    Reg("vpd_data", 0x04, 4, rw=U32),
)

MSI_64BIT = 0x0080
MSI_MASKABLE = 0x0100


def _msi64(ctx: Ctx) -> bool:
    return bool(ctx.u16(2) & MSI_64BIT)


def _msi_layout(is64: bool, maskable: bool) -> Callable[[Ctx], bool]:
    return lambda ctx: _msi64(ctx) == is64 and bool(ctx.u16(2) & MSI_MASKABLE) == maskable


def _msi_mask_rw(ctx: Ctx) -> int:
    # Only the mask bits of vectors the function can request are implemented.
    vectors = 1 << min((ctx.u16(2) >> 1) & 0x7, 5)
    return (1 << vectors) - 1


MSI_REGS = (   # PCI LB 3.0 §6.8.1: Enable (0) and Multiple Message Enable (6:4) RW
    Reg("msi_control", 0x02, 2, rw=0x0071),
    Reg("msi_address", 0x04, 4, rw=0xFFFF_FFFC),
    Reg("msi_address_upper", 0x08, 4, rw=U32, when=_msi64),
    Reg("msi_data", 0x08, 2, rw=U16, when=lambda ctx: not _msi64(ctx)),
    Reg("msi_data", 0x0C, 2, rw=U16, when=_msi64),
    Reg("msi_mask", 0x0C, 4, rw=_msi_mask_rw, when=_msi_layout(False, True)),
    Reg("msi_mask", 0x10, 4, rw=_msi_mask_rw, when=_msi_layout(True, True)),
)

MSIX_REGS = (  # PCI LB 3.0 §6.8.2: MSI-X Enable (15) and Function Mask (14)
    Reg("msix_control", 0x02, 2, rw=0xC000),
)

# PCI Express capability (PCIe Base 4.0 §7.5.3).  Device/port type, bits 7:4 of
# the PCIe Capabilities register:
PCIE_ROOT_PORT, PCIE_DOWNSTREAM, PCIE_PCIE_TO_PCI, PCIE_PCI_TO_PCIE = 0x4, 0x6, 0x7, 0x8
PCIE_RCIEP, PCIE_RCEC = 0x9, 0xA
PCIE_DOWNSTREAM_FACING = {PCIE_ROOT_PORT, PCIE_DOWNSTREAM, PCIE_PCI_TO_PCIE}
PCIE_NO_LINK = {PCIE_RCIEP, PCIE_RCEC}
PCIE_ROOT_REGS = {PCIE_ROOT_PORT, PCIE_RCEC}
PCIE_SLOT_IMPLEMENTED = 0x0100

LNKCTL_COMMON_RW = 0x03CB     # ASPM 1:0, RCB 3, common clock 6, ext synch 7, clock PM 8, HW width disable 9
LNKCTL_PORT_RW = 0x0C10       # link disable 4, BW mgmt int 10, autonomous BW int 11
LNKSTA_PORT_RW1C = 0xC000     # link BW management status 14, autonomous BW status 15


def _pcie_type(ctx: Ctx) -> int:
    return (ctx.u16(2) >> 4) & 0xF


def _devctl_rw(ctx: Ctx) -> int:
    # Bit 15 is "Bridge Configuration Retry Enable" (RW) on PCIe-to-PCI bridges and
    # "Initiate FLR" elsewhere, which always reads 0.
    return U16 if _pcie_type(ctx) == PCIE_PCIE_TO_PCI else 0x7FFF


def _lnkctl_rw(ctx: Ctx) -> int:
    return LNKCTL_COMMON_RW | (LNKCTL_PORT_RW if _pcie_type(ctx) in PCIE_DOWNSTREAM_FACING else 0)


PCIE_REGS = (
    Reg("devctl", 0x08, 2, rw=_devctl_rw),
    Reg("devsta", 0x0A, 2, rw1c=0x000F),               # CED, NFED, FED, URD
    Reg("lnkctl", 0x10, 2, rw=_lnkctl_rw, when=lambda ctx: _pcie_type(ctx) not in PCIE_NO_LINK),
    Reg("lnksta", 0x12, 2, rw1c=LNKSTA_PORT_RW1C, when=lambda ctx: _pcie_type(ctx) in PCIE_DOWNSTREAM_FACING),
    Reg("sltctl", 0x18, 2, rw=0x1FFF, when=lambda ctx: bool(ctx.u16(2) & PCIE_SLOT_IMPLEMENTED)),
    Reg("sltsta", 0x1A, 2, rw1c=0x011F, when=lambda ctx: bool(ctx.u16(2) & PCIE_SLOT_IMPLEMENTED)),
    Reg("rootctl", 0x1C, 2, rw=0x001F, when=lambda ctx: _pcie_type(ctx) in PCIE_ROOT_REGS),
    Reg("rootsta", 0x20, 4, rw1c=0x0001_0000, when=lambda ctx: _pcie_type(ctx) in PCIE_ROOT_REGS),
    Reg("devctl2", 0x28, 2, rw=0xF7FF, when=lambda ctx: (ctx.u16(2) & 0xF) >= 2),
)

LEGACY_CAPS: dict[int, tuple[str, tuple[Reg, ...]]] = {
    0x01: ("pm", PM_REGS),
    0x03: ("vpd", VPD_REGS),
    0x05: ("msi", MSI_REGS),
    0x09: ("vendor", ()),          # vendor-specific: read-only
    0x10: ("pcie", PCIE_REGS),
    0x11: ("msix", MSIX_REGS),
}


# --- extended capabilities ------------------------------------------------------

AER_UNCOR_BITS = 0x07FF_F030   # PCIe 4.0 §7.8.4.2: bits 4, 5, 12-26
AER_COR_BITS = 0x0000_F1C1     # §7.8.4.5: bits 0, 6, 7, 8, 12-15


def _aer_control_rw(ctx: Ctx) -> int:
    # ECRC generation/check and multiple-header enables are RW only when capable.
    cap = ctx.u32(0x18)
    return ((cap >> 5) & 1) << 6 | ((cap >> 7) & 1) << 8 | ((cap >> 9) & 1) << 10


def _pcie_port_is_root(ctx: Ctx) -> bool:
    return ctx.pcie is not None and ((ctx.at16(ctx.pcie + 2) >> 4) & 0xF) in PCIE_ROOT_REGS


AER_REGS = (
    Reg("uncor_status", 0x04, 4, rw1c=AER_UNCOR_BITS),
    Reg("uncor_mask", 0x08, 4, rw=AER_UNCOR_BITS),
    Reg("uncor_severity", 0x0C, 4, rw=AER_UNCOR_BITS),
    Reg("cor_status", 0x10, 4, rw1c=AER_COR_BITS),
    Reg("cor_mask", 0x14, 4, rw=AER_COR_BITS),
    Reg("aer_control", 0x18, 4, rw=_aer_control_rw),
    Reg("root_err_command", 0x2C, 4, rw=0x7, when=_pcie_port_is_root),
    Reg("root_err_status", 0x30, 4, rw1c=0x7F, when=_pcie_port_is_root),
)

ACS_REGS = (   # §7.7.7: a control bit is RW when its capability bit (same position) is set
    Reg("acs_control", 0x06, 2, rw=lambda ctx: ctx.u16(4) & 0x7F),
)

ARI_REGS = (   # §7.8.7: MFVC/ACS function-group enables and the function group
    Reg("ari_control", 0x06, 2, rw=0x0073),
)

SRIOV_FIRST_VF_BAR = 0x24
SRIOV_RESOURCE_INDEX = 7      # sysfs resource lines 7..12 are the VF BARs (total over TotalVFs)


def _vf_bar(i: int) -> tuple[Callable[[Ctx], int], Callable[[Ctx], int | None]]:
    def layout(ctx: Ctx):
        total_vfs = ctx.u16(0x0E)
        return _bar_layout(ctx, ctx.base + SRIOV_FIRST_VF_BAR, 6, SRIOV_RESOURCE_INDEX, total_vfs)[i]
    return (lambda ctx: layout(ctx)[0]), (lambda ctx: layout(ctx)[1])


SRIOV_REGS = (   # §9.3.3
    Reg("sriov_control", 0x08, 2, rw=0x001F),      # VF enable, migration, MSE, ARI hierarchy
    Reg("sriov_status", 0x0A, 2, rw1c=0x0001),
    Reg("num_vfs", 0x10, 2, rw=U16),
    Reg("system_page_size", 0x20, 4, rw=U32),
    *(Reg(f"vf_bar{i}", SRIOV_FIRST_VF_BAR + 4 * i, 4, rw=_vf_bar(i)[0], init=_vf_bar(i)[1]) for i in range(6)),
)

EXTENDED_CAPS: dict[int, tuple[str, tuple[Reg, ...]]] = {
    0x0001: ("aer", AER_REGS),
    0x0003: ("dsn", ()),
    0x000B: ("vsec", ()),
    0x000D: ("acs", ACS_REGS),
    0x000E: ("ari", ARI_REGS),
    0x0010: ("sriov", SRIOV_REGS),
}


# --- capability walk ------------------------------------------------------------

def find_capabilities(cfg: bytes) -> list[Capability]:
    """Walk the legacy list and, for 4096-byte config spaces, the extended list."""
    caps: list[Capability] = []
    header_type = cfg[0x0E] & 0x7F
    status = int.from_bytes(cfg[0x06:0x08], "little")
    if status & STATUS_CAP_LIST and header_type in CAP_POINTER:
        ptr, seen = cfg[CAP_POINTER[header_type]] & 0xFC, set()
        while ptr >= 0x40 and ptr not in seen and len(seen) < MAX_CAPS:
            seen.add(ptr)
            cap_id = cfg[ptr]
            caps.append(Capability("legacy", cap_id, ptr, LEGACY_CAPS.get(cap_id, (f"cap{cap_id:02x}",))[0]))
            ptr = cfg[ptr + 1] & 0xFC
    if len(cfg) > EXT_CAP_START:
        ptr, seen = EXT_CAP_START, set()
        while ptr >= EXT_CAP_START and ptr not in seen and len(seen) < MAX_CAPS:
            seen.add(ptr)
            header = int.from_bytes(cfg[ptr:ptr + 4], "little")
            if header in (0, U32):
                break
            cap_id = header & 0xFFFF
            caps.append(Capability("extended", cap_id, ptr,
                                   EXTENDED_CAPS.get(cap_id, (f"ecap{cap_id:04x}",))[0]))
            ptr = (header >> 20) & 0xFFC
    return caps


# --- value-dependent hooks ------------------------------------------------------

def _pm_power_state(old: bytes, new: bytearray, pmcsr: int) -> None:
    """A write of an unsupported D-state completes but the state does not change (PM 1.2 §3.2.4)."""
    pmc = int.from_bytes(old[pmcsr - 2:pmcsr], "little")
    required = PM_STATE_SUPPORT_BIT[new[pmcsr] & 0x3]
    if required and not pmc & required:
        new[pmcsr] = (new[pmcsr] & ~0x3) | (old[pmcsr] & 0x3)


HOOKS: dict[str, Callable[[bytes, bytearray, int], None]] = {
    "pm_power_state": _pm_power_state,
}


# --- the compiled model -----------------------------------------------------------

@dataclass
class Model:
    """Compiled writable-bit masks of one function, serialisable to JSON."""

    config_size: int
    rw: bytes
    rw1c: bytes
    fields: tuple[Field, ...] = ()
    hooks: tuple[tuple[str, int, int], ...] = ()      # (name, offset, size)
    capabilities: tuple[Capability, ...] = ()
    initial: dict[int, tuple[int, int]] = field(default_factory=dict)  # offset -> (size, forced value)

    def apply(self, cfg: bytes, offset: int, size: int, value: int) -> bytes:
        """Return the new ``size`` bytes at ``offset`` after hardware takes ``value``."""
        end = offset + size
        new = bytearray(cfg)
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            rw, rw1c = self.rw[offset + i], self.rw1c[offset + i]
            new[offset + i] = ((new[offset + i] & ~rw) | (byte & rw)) & ~(byte & rw1c) & 0xFF
        for name, hook_off, hook_size in self.hooks:
            if hook_off < end and offset < hook_off + hook_size:
                HOOKS[name](cfg, new, hook_off)
        return bytes(new[offset:end])

    def describe(self, offset: int) -> str:
        """Name of the modelled register holding ``offset`` ('' if read-only/unmodelled)."""
        for f in self.fields:
            if f.offset <= offset < f.offset + f.size:
                return f.name
        return ""

    def to_dict(self) -> dict:
        return {
            "format": 1,
            "config_size": self.config_size,
            "rw": self.rw.hex(),
            "rw1c": self.rw1c.hex(),
            "hooks": [list(h) for h in self.hooks],
            "initial": {str(k): list(v) for k, v in self.initial.items()},
            "capabilities": [[c.kind, c.cap_id, c.offset, c.name] for c in self.capabilities],
            "fields": [[f.name, f.offset, f.size, f.rw, f.rw1c] for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Model":
        if d.get("format") != 1:
            raise ValueError("unknown sim model format")
        return cls(
            config_size=d["config_size"],
            rw=bytes.fromhex(d["rw"]),
            rw1c=bytes.fromhex(d["rw1c"]),
            hooks=tuple(tuple(h) for h in d["hooks"]),
            initial={int(k): tuple(v) for k, v in d["initial"].items()},
            capabilities=tuple(Capability(*c) for c in d["capabilities"]),
            fields=tuple(Field(*f) for f in d["fields"]),
        )


def _mask(value: Mask, ctx: Ctx) -> int:
    return value(ctx) if callable(value) else value


def compile_model(cfg: bytes, resources: tuple[Resource, ...]) -> Model:
    """Evaluate the tables against one function's config bytes and resources."""
    ctx = Ctx(bytes(cfg), tuple(resources))
    size = len(cfg)
    rw, rw1c = bytearray(size), bytearray(size)
    fields: list[Field] = []
    hooks: list[tuple[str, int, int]] = []
    initial: dict[int, tuple[int, int]] = {}

    def add(block_name: str, base: int, regs: tuple[Reg, ...]) -> None:
        ctx.base = base
        for reg in regs:
            off = base + reg.offset
            if off + reg.size > size or (reg.when and not reg.when(ctx)):
                continue
            reg_rw, reg_rw1c = _mask(reg.rw, ctx), _mask(reg.rw1c, ctx)
            rw[off:off + reg.size] = reg_rw.to_bytes(reg.size, "little")
            rw1c[off:off + reg.size] = reg_rw1c.to_bytes(reg.size, "little")
            fields.append(Field(f"{block_name}.{reg.name}" if block_name else reg.name,
                                off, reg.size, reg_rw, reg_rw1c))
            forced = reg.init(ctx) if reg.init else None
            if forced is not None:
                initial[off] = (reg.size, forced)
            if reg.hook:
                hooks.append((reg.hook, off, reg.size))

    header_type = cfg[0x0E] & 0x7F
    add("", 0, HEADER_COMMON + HEADER_TABLES.get(header_type, ()))
    caps = find_capabilities(ctx.cfg)
    ctx.pcie = next((c.offset for c in caps if c.kind == "legacy" and c.cap_id == 0x10), None)
    for cap in caps:
        table = (LEGACY_CAPS if cap.kind == "legacy" else EXTENDED_CAPS).get(cap.cap_id)
        if table:
            add(f"{cap.name}@{cap.offset:#x}", cap.offset, table[1])
    return Model(size, bytes(rw), bytes(rw1c), tuple(fields), tuple(hooks), tuple(caps), initial)


def power_on_config(cfg: bytes, model: Model) -> bytes:
    """The dump's bytes with the model's forced values (e.g. unimplemented BARs read 0)."""
    out = bytearray(cfg)
    for off, (size, value) in model.initial.items():
        out[off:off + size] = value.to_bytes(size, "little")
    return bytes(out)
