"""Xenstore node paths of the PV PCI device, as libxl writes them and pcifront reads them.

One backend device (devid 0) per guest, served by dom0:

    /local/domain/0/backend/pci/<domid>/0          backend directory (dom0-owned, guest-readable)
    /local/domain/<domid>/device/pci/0             frontend directory (guest-owned, dom0-readable)
    /local/domain/0/error/backend/pci/<domid>/0/error   xenbus_dev_fatal's "<errno> <message>"
"""

from __future__ import annotations

BACKEND_ROOT = "/local/domain/0/backend/pci"


def backend_domain_path(domid: int) -> str:
    """``BACKEND_ROOT/<domid>``: the parent of a guest's backend devices (removed at teardown)."""
    return f"{BACKEND_ROOT}/{domid}"


def backend_path(domid: int) -> str:
    """The guest's backend directory (devid 0)."""
    return f"{BACKEND_ROOT}/{domid}/0"


def frontend_path(domid: int) -> str:
    """The guest's frontend directory (devid 0)."""
    return f"/local/domain/{domid}/device/pci/0"


def error_path(domid: int) -> str:
    """The node a fatal backend error is reported in."""
    return f"/local/domain/0/error/backend/pci/{domid}/0/error"
