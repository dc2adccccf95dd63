"""Functions dom0 has set aside for guests: those bound to a stub driver."""

from __future__ import annotations

from pathlib import Path

from pcibackd.wire.bdf import BDF

STUB_DRIVERS = ("pciback", "pci-stub", "vfio-pci")


def stub_bound(root: Path = Path("/")) -> list[BDF]:
    """Every function bound to one of :data:`STUB_DRIVERS` (kept away from dom0's own drivers)."""
    found = set()
    for drv in STUB_DRIVERS:
        d = root / "sys/bus/pci/drivers" / drv
        if d.is_dir():
            for entry in d.iterdir():
                try:
                    found.add(BDF.parse(entry.name))
                except ValueError:
                    pass
    return sorted(found)
