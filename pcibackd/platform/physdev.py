"""The real ``Physdev`` (``irq.ports``): Xen's PIRQ hypercalls and dom0's config writes.

Used by the supervisor only; workers never load libxencall/libxenctrl (they
would hold ``/dev/xen/privcmd``).  Handles are opened on first use, in the
process that uses them, never before the worker fork server starts.

* ``map_pirq``: libxenctrl's ``xc_physdev_map_pirq_msi`` (``MAP_PIRQ_TYPE_MSI``,
  index and PIRQ -1: Xen picks the PIRQ); it passes segment 0, so a function on
  another segment goes through a raw ``PHYSDEVOP_map_pirq`` with
  ``MAP_PIRQ_TYPE_MSI_SEG`` (bus field = segment << 16 | bus).  A non-zero
  ``table_base`` (the MSI-X table BAR's address) selects MSI-X in Xen.
* ``unmap_pirq``: ``xc_physdev_unmap_pirq``.
* ``prepare_msix`` (30), ``release_msix`` (31), ``restore_msi_ext`` (27): not
  wrapped by libxenctrl; issued with libxencall's ``xencall2(physdev_op, cmd,
  buf)`` on ``struct physdev_pci_device {u16 seg; u8 bus; u8 devfn}`` in a
  hypercall-safe buffer.
* config access: the function's sysfs ``config`` file, one exact-width
  ``pread``/``pwrite``.  Writes are 2 bytes at even offsets only: Xen's
  intercept lets dom0 write an MSI/MSI-X control word only that way and drops
  other writes silently, so the caller reads every write back.

Every failure is an ``OSError`` with Xen's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import Callable

from pcibackd.platform.api import PlatformError
from pcibackd.wire.bdf import BDF

HYPERVISOR_PHYSDEV_OP = 33
PHYSDEVOP_RESTORE_MSI_EXT = 27
PHYSDEVOP_PREPARE_MSIX = 30
PHYSDEVOP_RELEASE_MSIX = 31
PHYSDEVOP_MAP_PIRQ = 13
MAP_PIRQ_TYPE_MSI_SEG = 3
BUFFER_SIZE = 64                 # the largest argument: struct physdev_map_pirq, 40 bytes
CONFIG_SPACE = 4096

# struct physdev_map_pirq (Xen 4.17 public/physdev.h): domid u16 @0, type @4,
# index @8, pirq @12, bus @16, devfn @20, entry_nr @24, table_base u64 @32
_MAP_PIRQ = struct.Struct("<H2xiiiiii4xQ")
_PCI_DEVICE = struct.Struct("<HBB")


class RealPhysdev:
    """See module doc.  ``load`` is ``platform.xen.load_library`` (a fake in tests)."""

    def __init__(self, load: Callable[[str], object], root: Path = Path("/")) -> None:
        self._load, self.root = load, Path(root)
        self._pid = -1
        self._xc = self._xch = self._call = self._xcall = None
        self._buf: int | None = None

    # -- handles ---------------------------------------------------------------

    def _ctrl(self):
        self._own()
        if self._xch is None:
            self._xc = self._load("ctrl")
            xch = self._xc.xc_interface_open(None, None, 0)
            if not xch:
                raise PlatformError(ctypes.get_errno() or errno.EACCES, "xc_interface_open failed (not dom0?)")
            self._xch = xch
        return self._xc, self._xch

    def _hypercall(self, op: int, payload: bytes) -> tuple[int, bytes]:
        """``physdev_op(op, payload)``; the return value and the buffer after the call."""
        self._own()
        if self._xcall is None:
            self._call = self._load("call")
            xcall = self._call.xencall_open(None, 0)
            if not xcall:
                raise PlatformError(ctypes.get_errno() or errno.EACCES, "xencall_open failed (not dom0?)")
            buf = self._call.xencall_alloc_buffer(xcall, BUFFER_SIZE)
            if not buf:
                self._call.xencall_close(xcall)
                raise PlatformError(ctypes.get_errno() or errno.ENOMEM, "xencall_alloc_buffer failed")
            self._xcall, self._buf = xcall, buf
        ctypes.memset(self._buf, 0, BUFFER_SIZE)
        ctypes.memmove(self._buf, payload, len(payload))
        ctypes.set_errno(0)
        rc = self._call.xencall2(self._xcall, HYPERVISOR_PHYSDEV_OP, op, self._buf)
        if rc < 0:
            raise _error(f"physdev_op {op}")
        return rc, ctypes.string_at(self._buf, BUFFER_SIZE)

    def _own(self) -> None:
        # A handle inherited over fork belongs to the parent: forget it, open our own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._xc = self._xch = self._call = self._xcall = None
            self._buf = None

    def close(self) -> None:
        """Close the handles this process opened."""
        if self._pid == os.getpid():
            if self._xch is not None:
                self._xc.xc_interface_close(self._xch)
            if self._xcall is not None:
                self._call.xencall_free_buffer(self._xcall, self._buf)
                self._call.xencall_close(self._xcall)
        self._pid = -1
        self._own()

    # -- Physdev -------------------------------------------------------------------

    def prepare_msix(self, bdf: BDF) -> None:
        self._hypercall(PHYSDEVOP_PREPARE_MSIX, _pci_device(bdf))

    def release_msix(self, bdf: BDF) -> None:
        self._hypercall(PHYSDEVOP_RELEASE_MSIX, _pci_device(bdf))

    def restore_msi(self, bdf: BDF) -> None:
        self._hypercall(PHYSDEVOP_RESTORE_MSI_EXT, _pci_device(bdf))

    def map_pirq(self, domid: int, kind, bdf: BDF, entry: int, table_base: int) -> int:
        """A PIRQ of ``domid`` for MSI (``table_base`` 0) or MSI-X entry ``entry``."""
        if (kind == "msix") != (table_base != 0):
            raise PlatformError(errno.EINVAL, f"{kind}: table_base {table_base:#x} selects the other kind")
        devfn = bdf.dev << 3 | bdf.fn
        if bdf.domain:
            args = _MAP_PIRQ.pack(domid, MAP_PIRQ_TYPE_MSI_SEG, -1, -1, bdf.domain << 16 | bdf.bus, devfn,
                                  entry, table_base)
            _rc, out = self._hypercall(PHYSDEVOP_MAP_PIRQ, args)
            return _MAP_PIRQ.unpack_from(out)[3]
        lib, xch = self._ctrl()
        pirq = ctypes.c_int(-1)
        ctypes.set_errno(0)
        if lib.xc_physdev_map_pirq_msi(xch, domid, -1, ctypes.byref(pirq), devfn, bdf.bus, entry, table_base) < 0:
            raise _error(f"map_pirq(dom{domid}, {bdf}, entry {entry})")
        return pirq.value

    def unmap_pirq(self, domid: int, pirq: int) -> None:
        lib, xch = self._ctrl()
        ctypes.set_errno(0)
        if lib.xc_physdev_unmap_pirq(xch, domid, pirq) < 0:
            raise _error(f"unmap_pirq(dom{domid}, {pirq})")

    def read_config(self, bdf: BDF, offset: int, size: int) -> int:
        _check_access(offset, size)
        fd = os.open(self._config(bdf), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise PlatformError(errno.EIO, f"{bdf}: short config read at {offset:#x}")
        return int.from_bytes(data, "little")

    def write_config(self, bdf: BDF, offset: int, size: int, value: int) -> None:
        if size != 2 or offset % 2:
            raise PlatformError(errno.EINVAL, f"{bdf}: only 2-byte control writes ({size} at {offset:#x})")
        _check_access(offset, size)
        if not 0 <= value <= 0xFFFF:
            raise PlatformError(errno.EINVAL, f"{bdf}: {value:#x} does not fit 2 bytes")
        fd = os.open(self._config(bdf), os.O_RDWR | os.O_CLOEXEC)
        try:
            done = os.pwrite(fd, value.to_bytes(2, "little"), offset)
        finally:
            os.close(fd)
        if done != 2:
            raise PlatformError(errno.EIO, f"{bdf}: short config write at {offset:#x}")

    def _config(self, bdf: BDF) -> Path:
        return self.root / "sys/bus/pci/devices" / str(bdf) / "config"


def _pci_device(bdf: BDF) -> bytes:
    return _PCI_DEVICE.pack(bdf.domain, bdf.bus, bdf.dev << 3 | bdf.fn)


def _check_access(offset: int, size: int) -> None:
    if size not in (1, 2, 4) or offset % size or not 0 <= offset <= CONFIG_SPACE - size:
        raise PlatformError(errno.EINVAL, f"config access of {size} bytes at {offset:#x}")


def _error(what: str) -> PlatformError:
    err = ctypes.get_errno() or errno.EIO
    return PlatformError(err, f"{what}: {os.strerror(err)}")
