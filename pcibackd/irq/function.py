"""What the interrupt code knows of a function: MSI/MSI-X registers and a seize-time record.

Register layout from PCI Local Bus 3.0 §6.7 (capability list), §6.8.1 (MSI),
§6.8.2 (MSI-X) and PCI PM 1.2 §3.2 (PMCSR).  Like Linux (``dev->msi_cap``,
``dev->msix_cap``), only the FIRST capability of each ID in the legacy list
counts, found with a walk bounded the way ``pci_find_capability`` bounds it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from pcibackd.hostpci.port import DeviceInfo, find_capability
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciregs import CAP_MSI, CAP_MSIX, CAP_PM, MSI_FLAGS, MSIX_BIR, MSIX_QSIZE, MSIX_TABLE, NR_BARS

Read = Callable[[int, int], int]          # (offset, size) -> value

class Kind(str, enum.Enum):
    """Which message-interrupt mechanism a mapping belongs to."""

    msi = "msi"
    msix = "msix"



def msix_table_size(control: int) -> int:
    """Entries in the MSI-X table, from the Message Control word."""
    return (control & MSIX_QSIZE) + 1


def control_offset(cap: int) -> int:
    """Message Control of an MSI or MSI-X capability (same place in both)."""
    return cap + MSI_FLAGS


@dataclass(frozen=True)
class FunctionRecord:
    """A function's interrupt facts, captured once at seize, before any guest ran.

    ``table_base`` is the start of the BAR holding the MSI-X table, from the
    sysfs resource captured then: never re-read from a function a guest has
    had (XSA-337).  0 means no usable table.  ``intx`` is False for an SR-IOV
    VF: it has no INTx, and its COMMAND.INTX_DISABLE is hardwired 0.
    """

    bdf: BDF
    msi_cap: int | None = None
    msix_cap: int | None = None
    msix_entries: int = 0
    msix_bir: int = 0
    table_base: int = 0
    pm_cap: int | None = None
    intx: bool = True

    @property
    def has_msix(self) -> bool:
        return self.msix_cap is not None and self.table_base != 0

    def cap(self, kind: Kind) -> int | None:
        return self.msi_cap if kind is Kind.msi else self.msix_cap


def record_for(read: Read, info: DeviceInfo) -> FunctionRecord:
    """Capture the record of ``info.bdf`` through ``read`` (its config space)."""
    msi = find_capability(read, CAP_MSI)
    msix = find_capability(read, CAP_MSIX)
    entries = bir = base = 0
    if msix is not None:
        entries = msix_table_size(read(control_offset(msix), 2))
        bir = read(msix + MSIX_TABLE, 4) & MSIX_BIR
        if bir < NR_BARS and bir < len(info.resources):
            base = info.resources[bir].start
    return FunctionRecord(info.bdf, msi, msix, entries, bir, base, find_capability(read, CAP_PM),
                          intx=not info.is_virtfn)
