"""Wire layout of Xen's PV PCI protocol (public/io/pciif.h) and xenbus states.

All structures are little-endian and naturally aligned with no padding:

    xen_msix_entry      4 bytes   vector:u16 @0, entry:u16 @2
    xen_pci_op        548 bytes   cmd@0 err@4 domain@8 bus@12 devfn@16 offset@20
                                  size@24 value@28 info@32 msix_entries[128]@36
    xen_pcie_aer_op    20 bytes   cmd@0 err@4 domain@8 bus@12 devfn@16
    xen_pci_sharedinfo 572 bytes  flags@0 op@4 aer_op@552

Offsets named ``SH_*`` are relative to the start of the shared page, which is
what the worker and the frontend index.  Only this module knows the layout.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

XEN_PCI_MAGIC = "7"

# Flag bits in xen_pci_sharedinfo.flags, under pciif.h's names: the leading
# underscore marks a bit number (for set_bit/clear_bit), not a private name.
_XEN_PCIF_active = 0      # frontend: op pending / backend clears: answer ready
_XEN_PCIB_AERHANDLER = 1  # frontend: a PV AER handler is registered
_XEN_PCIB_active = 2      # backend: AER op pending / frontend clears
XEN_PCIF_active = 1 << _XEN_PCIF_active
XEN_PCIB_AERHANDLER = 1 << _XEN_PCIB_AERHANDLER
XEN_PCIB_active = 1 << _XEN_PCIB_active

SH_INFO_MAX_VEC = 128


class Op(enum.IntEnum):
    """XEN_PCI_OP_* command numbers."""

    conf_read = 0
    conf_write = 1
    enable_msi = 2
    disable_msi = 3
    enable_msix = 4
    disable_msix = 5
    aer_detected = 6
    aer_resume = 7
    aer_mmio = 8
    aer_slotreset = 9
    enable_multi_msi = 10


class Err(enum.IntEnum):
    """XEN_PCI_ERR_* values carried in op.err."""

    success = 0
    dev_not_found = -1
    invalid_offset = -2
    access_denied = -3
    not_implemented = -4
    op_failed = -5


class XenbusState(enum.IntEnum):
    """xen/include/public/io/xenbus.h."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


# Structures (no padding: '<' means standard sizes, no alignment fill).
MSIX_ENTRY = struct.Struct("<HH")
OP_HEADER = struct.Struct("<IiIIIiiII")          # cmd .. info
PCI_OP = struct.Struct("<IiIIIiiII" + "HH" * SH_INFO_MAX_VEC)
AER_OP = struct.Struct("<IiIII")
SHAREDINFO = struct.Struct("<I" + PCI_OP.format[1:] + AER_OP.format[1:])


class OpHeader(NamedTuple):
    """The scalar fields of ``xen_pci_op`` (:data:`OP_HEADER`), as read from a private copy."""

    cmd: int
    err: int
    domain: int
    bus: int
    devfn: int
    offset: int
    size: int
    value: int
    info: int

    @classmethod
    def unpack(cls, op: bytes) -> "OpHeader":
        """The header at the start of ``op`` (a ``xen_pci_op``)."""
        # tuple.__new__ skips _make's length check: the struct yields exactly the fields (op path)
        return tuple.__new__(cls, OP_HEADER.unpack_from(op))


assert len(OpHeader._fields) == len(OP_HEADER.unpack(bytes(OP_HEADER.size)))


# Field offsets inside xen_pci_op.
OP_CMD, OP_ERR, OP_DOMAIN, OP_BUS, OP_DEVFN = 0, 4, 8, 12, 16
OP_OFFSET, OP_SIZE, OP_VALUE, OP_INFO, OP_MSIX_ENTRIES = 20, 24, 28, 32, 36

# Offsets inside the shared page.
SH_FLAGS = 0
SH_OP = 4
SH_AER_OP = SH_OP + PCI_OP.size                   # 552
SH_OP_ERR = SH_OP + OP_ERR
SH_OP_VALUE = SH_OP + OP_VALUE
SH_OP_INFO = SH_OP + OP_INFO
SH_MSIX_ENTRIES = SH_OP + OP_MSIX_ENTRIES

# Scalar formats for the write-back of err, value and MSI-X vectors.
I32 = struct.Struct("<i")
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")

PAGE_SIZE = 4096
assert SHAREDINFO.size <= PAGE_SIZE


def msix_vector_offset(i: int) -> int:
    """Page offset of msix_entries[i].vector."""
    return SH_MSIX_ENTRIES + MSIX_ENTRY.size * i
