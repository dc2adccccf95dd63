"""libxenctrl calls of the toolstack side (ctypes): what libxl does in the
hypervisor for each passed-through function (docs: pciback-protocol.md §2.3
step 1, §2.6, §6.3):

* on ``pci-assignable-add``: quarantine, ``xc_assign_device(DOMID_IO, sbdf,
  RDM_RELAXED)``, so the function's DMA reaches no domain's memory while it
  waits (XSA-302/306);
* before the backend exports it to a guest (:func:`grant_device`):
  ``xc_domain_iomem_permission`` for every memory BAR (and the ROM),
  ``xc_domain_ioport_permission`` for every I/O BAR,
  ``xc_physdev_map_pirq(domid, irq, &pirq=irq)`` + ``xc_domain_irq_permission``
  for the legacy IRQ when ``0 < irq < 0xff`` (pcifront reads it from the
  interrupt line and binds it as a PIRQ), then ``xc_assign_device(domid, sbdf,
  0)``: the IOMMU confines its DMA to the guest's memory;
* on hot-unplug ``xc_deassign_device(domid)`` (Xen puts it back in quarantine;
  a destroyed domain's functions go there by themselves), and on
  ``pci-assignable-remove`` ``xc_deassign_device(DOMID_IO)`` hands it back to dom0.

Without these a passed-through function stays in dom0's IOMMU context: DMA it
is made to do lands in dom0's memory.  Real Xen only; the simulated platform
has nothing to grant.
"""

from __future__ import annotations

import ctypes
import errno
from pathlib import Path

from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.port import Resource
from pcibackd.hostpci.sysfs import parse_resource_text
from pcibackd.platform.api import PlatformError
from pcibackd.platform.xen import failure, load_library

PAGE_SHIFT = 12
DOMID_IO = 0x7FF1
XEN_DOMCTL_DEV_RDM_RELAXED = 1


def sbdf(bdf: BDF) -> int:
    """libxl's machine_sbdf encoding: segment << 16 | bus << 8 | devfn."""
    return bdf.domain << 16 | bdf.bus << 8 | bdf.dev << 3 | bdf.fn


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise failure(what)


def grants_for(bdf: BDF, root: Path = Path("/")) -> list[tuple[str, int, int]]:
    """("iomem", first_pfn, nr) / ("ioport", first, nr) / ("irq", irq, 0) for a function."""
    dev = root / "sys/bus/pci/devices" / str(bdf)
    out: list[tuple[str, int, int]] = []
    for r in parse_resource_text((dev / "resource").read_text())[:7]:       # BARs 0-5 and the ROM
        # Like libxl, a resource at address 0 is not granted; nor one the kernel left unassigned
        # or undecoded: its "range" would give the guest low host memory or ports.
        if r.start == 0 or r.flags & (Resource.IORESOURCE_UNSET | Resource.IORESOURCE_DISABLED):
            continue
        if r.flags & Resource.IORESOURCE_MEM:
            first = r.start >> PAGE_SHIFT
            out.append(("iomem", first, (r.end >> PAGE_SHIFT) - first + 1))
        elif r.flags & Resource.IORESOURCE_IO:
            out.append(("ioport", r.start, r.end - r.start + 1))
    irq = int((dev / "irq").read_text().strip() or "0")
    if 0 < irq < 0xFF:
        out.append(("irq", irq, 0))
    return out


class _Xc:
    """An open libxenctrl handle (context manager)."""

    def __enter__(self):
        self.lib = load_library("ctrl")
        self.xch = self.lib.xc_interface_open(None, None, 0)
        if not self.xch:
            raise PlatformError(ctypes.get_errno() or errno.EACCES, "xc_interface_open failed (not dom0?)")
        return self.lib, self.xch

    def __exit__(self, *exc) -> None:
        self.lib.xc_interface_close(self.xch)


# Xen 4.17 answers EOPNOTSUPP when the domain (or the whole host) has no IOMMU
# context, later releases ENXIO; ENOSYS is a Xen without the domctl.
_NO_IOMMU = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENXIO)
# the function (or the domain) is not where deassign looks for it
_NOT_THERE = (errno.ENODEV, errno.EINVAL, errno.ESRCH)


def assign_device(domid: int, bdf: BDF) -> str:
    """Put the function in ``domid``'s IOMMU context (``DOMID_IO``: quarantine).

    Quarantine on a host without an IOMMU is reported, not raised; a guest
    without an IOMMU context (created without ``passthrough=``) is an error,
    as with libxl: its DMA would not be confined."""
    relaxed = XEN_DOMCTL_DEV_RDM_RELAXED if domid == DOMID_IO else 0
    with _Xc() as (lib, xch):
        if lib.xc_assign_device(xch, domid, sbdf(bdf), relaxed) < 0:
            err = ctypes.get_errno()
            if err in _NO_IOMMU and domid == DOMID_IO:
                return f"{bdf}: no IOMMU, not quarantined (its DMA is not confined)"
            if err in _NO_IOMMU:
                raise PlatformError(err, f"xc_assign_device(dom{domid}, {bdf}): dom{domid} has no IOMMU context "
                                         "(create it with passthrough=\"enabled\"; or Xen runs without an IOMMU)")
            raise failure(f"xc_assign_device({_who(domid)}, {bdf})")
    return f"{bdf} assigned to {_who(domid)}"


def deassign_device(domid: int, bdf: BDF) -> str:
    """Take the function out of ``domid``'s IOMMU context; not being there is no error."""
    with _Xc() as (lib, xch):
        if lib.xc_deassign_device(xch, domid, sbdf(bdf)) < 0:
            err = ctypes.get_errno()
            if err in _NO_IOMMU + _NOT_THERE:
                return f"{bdf} was not assigned to {_who(domid)} ({errno.errorcode.get(err, err)})"
            raise failure(f"xc_deassign_device({_who(domid)}, {bdf})")
    return f"{bdf} deassigned from {_who(domid)}"


def revoke_device(domid: int, bdf: BDF, root: Path = Path("/")) -> list[str]:
    """Undo :func:`grant_device` and :func:`assign_device` for ``domid`` (hot-unplug,
    teardown); a domain already gone has nothing left to revoke."""
    done = [deassign_device(domid, bdf)]
    try:
        grant_device(domid, bdf, allow=False, root=root)
        done.append(f"dom{domid}: grants revoked")
    except PlatformError as exc:
        if exc.errno != errno.ESRCH:
            raise
        done.append(f"dom{domid} is gone: no grants to revoke")
    return done


def _who(domid: int) -> str:
    return "quarantine (DOMID_IO)" if domid == DOMID_IO else f"dom{domid}"


def grant_device(domid: int, bdf: BDF, allow: bool = True, root: Path = Path("/")) -> list[str]:
    """Grant (or revoke) ``domid`` the function's BARs and legacy IRQ, as libxl does."""
    done = []
    with _Xc() as (lib, xch):
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
    return done
