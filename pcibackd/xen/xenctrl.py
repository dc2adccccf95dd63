"""libxenctrl calls of the toolstack side (ctypes): what libxl grants a PV
guest for each passed-through function before the backend exports it
(docs: pciback-protocol.md §2.3 step 1, §6.3):

* ``xc_domain_iomem_permission`` for every memory BAR (and the ROM),
* ``xc_domain_ioport_permission`` for every I/O BAR,
* ``xc_physdev_map_pirq(domid, irq, &pirq=irq)`` + ``xc_domain_irq_permission``
  for the legacy IRQ when ``0 < irq < 0xff`` (pcifront reads it from the
  interrupt line and binds it as a PIRQ).

Real Xen only; the simulated platform has nothing to grant.
"""

from __future__ import annotations

import ctypes
import errno
from pathlib import Path

from ..pcihost.bdf import BDF
from ..pcihost.sysfs import parse_resource_text
from .platform import PlatformError
from .real import _failure, load_library

IORESOURCE_IO, IORESOURCE_MEM = 0x100, 0x200
PAGE_SHIFT = 12


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise _failure(what)


def grants_for(bdf: BDF, root: Path = Path("/")) -> list[tuple[str, int, int]]:
    """("iomem", first_pfn, nr) / ("ioport", first, nr) / ("irq", irq, 0) for a function."""
    dev = root / "sys/bus/pci/devices" / str(bdf)
    out: list[tuple[str, int, int]] = []
    for i, r in enumerate(parse_resource_text((dev / "resource").read_text())[:7]):
        if r.start == 0 and r.end == 0:
            continue
        if r.flags & IORESOURCE_MEM:
            first = r.start >> PAGE_SHIFT
            out.append(("iomem", first, (r.end >> PAGE_SHIFT) - first + 1))
        elif r.flags & IORESOURCE_IO:
            out.append(("ioport", r.start, r.end - r.start + 1))
    irq = int((dev / "irq").read_text().strip() or "0")
    if 0 < irq < 0xFF:
        out.append(("irq", irq, 0))
    return out


def grant_device(domid: int, bdf: BDF, allow: bool = True, root: Path = Path("/")) -> list[str]:
    """Grant (or revoke) ``domid`` the function's BARs and legacy IRQ, as libxl does."""
    lib = load_library("ctrl")
    xch = lib.xc_interface_open(None, None, 0)
    if not xch:
        raise PlatformError(ctypes.get_errno() or errno.EACCES, "xc_interface_open failed (not dom0?)")
    done = []
    try:
        for kind, a, n in grants_for(bdf, root):
            if kind == "iomem":
                _check(lib.xc_domain_iomem_permission(xch, domid, a, n, int(allow)), f"iomem {a:#x}+{n}")
            elif kind == "ioport":
                _check(lib.xc_domain_ioport_permission(xch, domid, a, n, int(allow)), f"ioport {a:#x}+{n}")
            else:
                if allow:
                    pirq = ctypes.c_int(a)
                    _check(lib.xc_physdev_map_pirq(xch, domid, a, ctypes.byref(pirq)), f"map_pirq {a}")
                    a = pirq.value
                _check(lib.xc_domain_irq_permission(xch, domid, a, int(allow)), f"irq_permission {a}")
            done.append(f"{kind} {a:#x}" + (f"+{n}" if n else ""))
    finally:
        lib.xc_interface_close(xch)
    return done
