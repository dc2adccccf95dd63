"""PCI configuration-space layout: register offsets, bits and capability IDs.

Facts of the public specifications (PCI Local Bus 3.0, PCI-to-PCI Bridge
Architecture 1.2, PCI Bus Power Management 1.2, PCI Express Base 4.0), shared
by the virtualization tables and the simulated hardware.  Values only.
Capability register offsets are relative to the capability's start.
"""

# -- header (type 0 device, type 1 bridge) -----------------------------------

COMMAND = 0x04
STATUS = 0x06
HEADER_TYPE = 0x0E
HEADER_TYPE_MASK = 0x7F               # bit 7 is the multi-function flag
BASE_ADDRESS_0 = 0x10
CARDBUS_CAPABILITY_LIST = 0x14        # type 2
ROM_ADDRESS = 0x30                    # type 0
CAPABILITY_LIST = 0x34
ROM_ADDRESS1 = 0x38                   # type 1
HEADER_END = 0x40

COMMAND_IO = 0x0001
COMMAND_MEM = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_SPECIAL = 0x0008
COMMAND_MWI = 0x0010                  # memory write and invalidate
COMMAND_VGA_SNOOP = 0x0020
COMMAND_PARITY = 0x0040
COMMAND_WAIT = 0x0080
COMMAND_SERR = 0x0100
COMMAND_FAST_B2B = 0x0200
COMMAND_INTX_DISABLE = 0x0400
COMMAND_DEFINED = 0x07FF              # bits 15:11 are reserved

STATUS_CAP_LIST = 0x0010
# Error bits, RW1C: master data parity error (8), signaled target abort (11),
# received target/master abort (12, 13), signaled system error (14), detected
# parity error (15).  A bridge's secondary status has the same layout.
STATUS_RW1C = 0xF900

BIST_CAPABLE = 0x80
BIST_START = 0x40

ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFF_F800

# -- capability IDs ----------------------------------------------------------

CAP_PM, CAP_VPD, CAP_MSI, CAP_VENDOR, CAP_PCIE, CAP_MSIX = 0x01, 0x03, 0x05, 0x09, 0x10, 0x11

EXT_CAP_START = 0x100
EXT_CAP_AER, EXT_CAP_DSN, EXT_CAP_VSEC = 0x0001, 0x0003, 0x000B
EXT_CAP_ACS, EXT_CAP_ARI, EXT_CAP_SRIOV = 0x000D, 0x000E, 0x0010

# Names accepted by the policy file for hide lists.
CAP_NAMES = {
    "pm": CAP_PM, "agp": 0x02, "vpd": CAP_VPD, "slotid": 0x04, "msi": CAP_MSI, "chswp": 0x06,
    "pcix": 0x07, "ht": 0x08, "vendor": CAP_VENDOR, "dbg": 0x0A, "ccrc": 0x0B, "shpc": 0x0C,
    "ssvid": 0x0D, "agp3": 0x0E, "secdev": 0x0F, "pcie": CAP_PCIE, "msix": CAP_MSIX,
    "sata": 0x12, "af": 0x13, "ea": 0x14,
}
EXT_CAP_NAMES = {
    "aer": EXT_CAP_AER, "vc": 0x02, "dsn": EXT_CAP_DSN, "pwr": 0x04, "rclink": 0x05, "vc9": 0x09,
    "vsec": EXT_CAP_VSEC, "acs": EXT_CAP_ACS, "ari": EXT_CAP_ARI, "ats": 0x0F,
    "sriov": EXT_CAP_SRIOV, "mriov": 0x11, "mcast": 0x12, "pri": 0x13, "rebar": 0x15,
    "dpa": 0x16, "tph": 0x17, "ltr": 0x18, "secpcie": 0x19, "pasid": 0x1B, "dpc": 0x1D,
    "l1ss": 0x1E, "ptm": 0x1F, "dvsec": 0x23, "dlf": 0x25, "pl16": 0x26,
}

# -- power management ----------------------------------------------------------

PM_PMC = 2                            # capabilities
PM_CTRL = 4                           # control/status (PMCSR)

PMC_D1, PMC_D2 = 0x0200, 0x0400       # D1/D2 supported
PMC_PME_SUPPORT = 0xF800

PMCSR_STATE = 0x0003                  # the D-state field
PMCSR_PME_ENABLE = 0x0100
PMCSR_DATA_SELECT = 0x1E00
PMCSR_PME_STATUS = 0x8000             # RW1C

D0, D1, D2, D3HOT = 0, 1, 2, 3        # PMCSR_STATE values

# -- vital product data ----------------------------------------------------------

VPD_ADDR_F = 0x8000                   # in the address register: 1 = write, 0 = read

# -- MSI / MSI-X -------------------------------------------------------------------

MSI_FLAGS = 2
MSI_ENABLE, MSI_64BIT, MSI_MASKABLE, MSI_EXT_DATA = 0x0001, 0x0080, 0x0100, 0x0200

MSIX_FLAGS, MSIX_TABLE, MSIX_PBA = 2, 4, 8   # control word; table and PBA offset/BIR dwords
MSIX_ENABLE, MSIX_MASKALL, MSIX_QSIZE = 0x8000, 0x4000, 0x07FF
MSIX_BIR = 0x7                                 # BAR indicator in the low bits of TABLE/PBA
NR_BARS = 6
