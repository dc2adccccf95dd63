"""The real platform: grants and event channels of a Xen domain.

Grant maps go through libxengnttab (``/dev/xen/gntdev``), grant shares through
the same library's xengntshr half (``/dev/xen/gntalloc``), event channels
through libxenevtchn (``/dev/xen/evtchn``), all by ctypes.  Every failure is a
:class:`~pcibackd.platform.api.PlatformError` carrying the C errno.

Handles belong to the process that opened them: after a fork the child opens
its own (gntdev mappings are not inherited by a child, and a shared evtchn fd
would split the events between processes).  A worker opens them in its setup,
before it gives up root (the nodes are root's): :meth:`RealPlatform.open_handles`
for grants, and one event-channel handle it keeps for all its rings.  A mapped page's
``buf`` and every slice of it must be dropped before ``close()``: the memory is
unmapped then, and a surviving slice would point at nothing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from ctypes import POINTER, c_int, c_size_t, c_uint, c_uint8, c_uint32, c_uint64, c_ulong, c_void_p
from typing import Callable

from pcibackd.hostpci.stubs import stub_bound
from pcibackd.hostpci.sysfs import SysfsDevice, open_function_files
from pcibackd.platform import atomic
from pcibackd.platform.api import PlatformError
from pcibackd.platform.physdev import RealPhysdev
from pcibackd.platform.select import running_on_xen
from pcibackd.wire.bdf import BDF

PAGE_SIZE = 4096
DOMID_MAX = 0x7FEF          # DOMID_FIRST_RESERVED - 1
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE

# library -> (soname, Debian package, {function: (restype, argtypes)})
_LIBS: dict[str, tuple[str, str, dict[str, tuple[object, list[object]]]]] = {
    "gnttab": ("libxengnttab.so.1", "libxengnttab1", {
        "xengnttab_open": (c_void_p, [c_void_p, c_uint]),
        "xengnttab_close": (c_int, [c_void_p]),
        "xengnttab_map_grant_ref": (c_void_p, [c_void_p, c_uint32, c_uint32, c_int]),
        "xengnttab_unmap": (c_int, [c_void_p, c_void_p, c_uint32]),
        "xengntshr_open": (c_void_p, [c_void_p, c_uint]),
        "xengntshr_close": (c_int, [c_void_p]),
        "xengntshr_share_pages": (c_void_p, [c_void_p, c_uint32, c_int, POINTER(c_uint32), c_int]),
        "xengntshr_unshare": (c_int, [c_void_p, c_void_p, c_uint32]),
    }),
    "evtchn": ("libxenevtchn.so.1", "libxenevtchn1", {
        "xenevtchn_open": (c_void_p, [c_void_p, c_uint]),
        "xenevtchn_close": (c_int, [c_void_p]),
        "xenevtchn_fd": (c_int, [c_void_p]),
        "xenevtchn_notify": (c_int, [c_void_p, c_uint32]),
        "xenevtchn_bind_unbound_port": (c_int, [c_void_p, c_uint32]),
        "xenevtchn_bind_interdomain": (c_int, [c_void_p, c_uint32, c_uint32]),
        "xenevtchn_unbind": (c_int, [c_void_p, c_uint32]),
        "xenevtchn_pending": (c_int, [c_void_p]),
        "xenevtchn_unmask": (c_int, [c_void_p, c_uint32]),
    }),
    # toolstack-side grants (pcibackd.platform.xenctrl)
    "ctrl": ("libxenctrl.so.4.17", "libxenctrl4.17", {
        "xc_interface_open": (c_void_p, [c_void_p, c_void_p, c_uint]),
        "xc_interface_close": (c_int, [c_void_p]),
        "xc_domain_iomem_permission": (c_int, [c_void_p, c_uint32, c_ulong, c_ulong, c_uint8]),
        "xc_domain_ioport_permission": (c_int, [c_void_p, c_uint32, c_uint32, c_uint32, c_uint32]),
        "xc_physdev_map_pirq": (c_int, [c_void_p, c_uint32, c_int, POINTER(c_int)]),
        "xc_domain_irq_permission": (c_int, [c_void_p, c_uint32, c_uint32, c_uint8]),
        "xc_assign_device": (c_int, [c_void_p, c_uint32, c_uint32, c_uint32]),
        "xc_deassign_device": (c_int, [c_void_p, c_uint32, c_uint32]),
        # the supervisor's interrupt broker (pcibackd.platform.physdev)
        "xc_physdev_map_pirq_msi": (c_int, [c_void_p, c_uint32, c_int, POINTER(c_int), c_int, c_int, c_int,
                                            c_uint64]),
        "xc_physdev_unmap_pirq": (c_int, [c_void_p, c_uint32, c_int]),
    }),
    # physdev ops libxenctrl does not wrap (pcibackd.platform.physdev)
    "call": ("libxencall.so.1", "libxencall1", {
        "xencall_open": (c_void_p, [c_void_p, c_uint]),
        "xencall_close": (c_int, [c_void_p]),
        "xencall_alloc_buffer": (c_void_p, [c_void_p, c_size_t]),
        "xencall_free_buffer": (None, [c_void_p, c_void_p]),
        "xencall2": (c_int, [c_void_p, c_uint, c_uint64, c_uint64]),
    }),
}

# the device node each handle kind opens: checked first for a clear error
DEVICES = {"gnttab": "/dev/xen/gntdev", "gntshr": "/dev/xen/gntalloc", "evtchn": "/dev/xen/evtchn"}

_loaded: dict[str, ctypes.CDLL] = {}


def load_library(kind: str) -> ctypes.CDLL:
    """The ctypes handle of ``kind`` ("gnttab", "evtchn", "ctrl" or "call") with typed functions."""
    if kind not in _loaded:
        soname, package, functions = _LIBS[kind]
        try:
            lib = ctypes.CDLL(soname, use_errno=True)
        except OSError as e:
            raise PlatformError(errno.ENOENT, f"cannot load {soname} (Debian package {package}): {e}") from e
        for name, (restype, argtypes) in functions.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _loaded[kind] = lib
    return _loaded[kind]


def failure(what: str) -> PlatformError:
    """The error of a libxen* call that just failed: its C errno (EIO if none) and ``what``."""
    err = ctypes.get_errno() or errno.EIO
    return PlatformError(err, f"{what}: {os.strerror(err)}")


def _check_device(kind: str) -> None:
    path = DEVICES[kind]
    if not os.path.exists(path):
        raise PlatformError(errno.ENOENT, f"{path} is missing: not a Xen domain, or its driver module is not loaded")


def _check_domid(domid: int) -> None:
    if not 0 <= domid <= DOMID_MAX:
        raise PlatformError(errno.EINVAL, f"domain id {domid} out of range")


def _check_u32(what: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise PlatformError(errno.EINVAL, f"{what} {value} out of range")


class MappedPage(atomic.PageBits):
    """A 4 KiB page mapped into this process (a :class:`SharedPage`)."""

    def __init__(self, address: int, release: Callable[[int], None] | None):
        self._address = self._bit_base = address
        self._raw = memoryview((ctypes.c_ubyte * PAGE_SIZE).from_address(address))
        self.buf = self._raw.cast("B")
        self._release = release
        self.closed = False

    def close(self) -> None:
        """Drop the views, then unmap (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._bit_base = None
        self.buf.release()
        self._raw.release()
        release, self._release = self._release, None
        if release is not None:
            release(self._address)

    def __enter__(self) -> MappedPage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handle:
    """One open of a libxen* handle, owned by the process that opened it."""

    def __init__(self, kind: str, opener: str, closer: str):
        self.lib = load_library("evtchn" if kind == "evtchn" else "gnttab")
        self._closer = getattr(self.lib, closer)
        _check_device(kind)
        ctypes.set_errno(0)
        self.ptr = getattr(self.lib, opener)(None, 0)
        if not self.ptr:
            raise failure(f"{opener} ({DEVICES[kind]})")
        self.pid = os.getpid()

    def close(self) -> None:
        if self.ptr and self.pid == os.getpid():
            self._closer(self.ptr)
        self.ptr = None


class RealEventChannel:
    """An open ``/dev/xen/evtchn`` (an :class:`EventChannel`); ``pending`` never blocks."""

    def __init__(self) -> None:
        self._h = _Handle("evtchn", "xenevtchn_open", "xenevtchn_close")
        self._lib = self._h.lib
        self._fd = self._lib.xenevtchn_fd(self._h.ptr)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_NONBLOCK)

    def _ptr(self) -> int:
        if not self._h.ptr:
            raise PlatformError(errno.EBADF, "event channel handle is closed")
        if self._h.pid != os.getpid():
            raise PlatformError(errno.EBADF, "event channel handle belongs to the parent process")
        return self._h.ptr

    def _port(self, what: str, result: int) -> int:
        if result < 0:
            raise failure(what)
        return result

    def fileno(self) -> int:
        return self._fd

    def alloc_unbound(self, remote_domid: int) -> int:
        _check_domid(remote_domid)
        return self._port(f"xenevtchn_bind_unbound_port(dom{remote_domid})",
                          self._lib.xenevtchn_bind_unbound_port(self._ptr(), remote_domid))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        _check_domid(remote_domid)
        _check_u32("remote port", remote_port)
        return self._port(f"xenevtchn_bind_interdomain(dom{remote_domid}, {remote_port})",
                          self._lib.xenevtchn_bind_interdomain(self._ptr(), remote_domid, remote_port))

    def notify(self, port: int) -> None:
        _check_u32("port", port)
        if self._lib.xenevtchn_notify(self._ptr(), port) < 0:
            raise failure(f"xenevtchn_notify({port})")

    def pending(self) -> int | None:
        ctypes.set_errno(0)
        port = self._lib.xenevtchn_pending(self._ptr())
        if port >= 0:
            return port
        if ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise failure("xenevtchn_pending")

    def unmask(self, port: int) -> None:
        _check_u32("port", port)
        if self._lib.xenevtchn_unmask(self._ptr(), port) < 0:
            raise failure(f"xenevtchn_unmask({port})")

    def unbind(self, port: int) -> None:
        _check_u32("port", port)
        if self._lib.xenevtchn_unbind(self._ptr(), port) < 0:
            raise failure(f"xenevtchn_unbind({port})")

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> RealEventChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoPhysdev:
    """A ``Physdev`` that fails every call with ENOSYS (a platform without the hypercalls).

    The broker then answers every MSI/MSI-X request with ENOSYS, which the
    worker passes to the guest as a refused enable (the guest falls back to
    INTx), and nothing is mapped.
    """

    def _nosys(self, *args) -> None:
        raise OSError(errno.ENOSYS, "MSI/MSI-X hypercalls are not available")

    prepare_msix = release_msix = map_pirq = unmap_pirq = restore_msi = _nosys
    read_config = write_config = _nosys


class RealPlatform:
    """Grants and event channels of the Xen domain this process runs in (a :class:`Platform`)."""

    name = "xen"

    def __init__(self, domid: int = 0):
        self.domid = domid
        self._handles: dict[str, _Handle] = {}
        self._shared: dict[int, MappedPage] = {}    # gref -> page granted by grant_page

    @classmethod
    def from_spec(cls, arg: str | None, domid: int) -> RealPlatform:
        """The ``xen`` platform spec takes no argument and needs a Xen domain."""
        if arg:
            raise ValueError(f"platform xen takes no argument (got {arg!r})")
        if not running_on_xen():
            raise PlatformError(errno.ENODEV, "platform xen: this machine is not running on Xen "
                                              "(neither /proc/xen nor /dev/xen exists)")
        return cls(domid)

    @staticmethod
    def worker_paths(arg: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """A worker reads sysfs (covered by every worker's rules) and writes no file of this
        platform; it maps grants and binds event channels through /dev/xen (see
        :func:`pcibackd.platform.select.worker_paths`)."""
        return (), (), ("/dev/xen",)

    # -- host PCI ------------------------------------------------------------

    def open_device(self, bdf: BDF) -> SysfsDevice:
        """The function's sysfs config space, writable (a dom0 serving a guest)."""
        return SysfsDevice(bdf, writable=True)

    def open_device_files(self, bdf: BDF, writable: bool = True) -> dict[str, int]:
        """The descriptors of the function's files, for a worker that may not open them."""
        return open_function_files(bdf, writable=writable)

    def device_from_files(self, bdf: BDF, files: dict[str, int], writable: bool = True) -> SysfsDevice:
        """The function over descriptors from :meth:`open_device_files` (taken over)."""
        return SysfsDevice(bdf, writable=writable, files=files)

    def assignable(self) -> list[BDF]:
        """Functions bound to a stub driver."""
        return stub_bound()

    def physdev(self) -> RealPhysdev:
        """The interrupt hypercalls and control writes (for the supervisor only: it opens privcmd)."""
        return RealPhysdev(load_library)

    def _handle(self, kind: str) -> _Handle:
        h = self._handles.get(kind)
        if h is None or h.pid != os.getpid():
            # a handle inherited over fork is left alone: its mappings stay with the parent
            prefix = "xengnttab" if kind == "gnttab" else "xengntshr"
            h = self._handles[kind] = _Handle(kind, f"{prefix}_open", f"{prefix}_close")
        return h

    def open_handles(self) -> None:
        """Open ``/dev/xen/gntdev`` now: a worker maps every grant through this one handle,
        also after it lost the right to open the node (root 0600)."""
        self._handle("gnttab")

    def map_grant(self, remote_domid: int, gref: int) -> MappedPage:
        """Map page ``gref`` granted by ``remote_domid`` read-write."""
        _check_domid(remote_domid)
        _check_u32("grant reference", gref)
        h = self._handle("gnttab")
        ctypes.set_errno(0)
        address = h.lib.xengnttab_map_grant_ref(h.ptr, remote_domid, gref, _PROT_RW)
        if not address:
            raise failure(f"xengnttab_map_grant_ref(dom{remote_domid}, gref {gref})")

        def unmap(addr: int, h: _Handle = h) -> None:
            if h.ptr and h.pid == os.getpid() and h.lib.xengnttab_unmap(h.ptr, addr, 1) < 0:
                raise failure("xengnttab_unmap")
        return MappedPage(address, unmap)

    def open_evtchn(self) -> RealEventChannel:
        return RealEventChannel()

    def grant_page(self, remote_domid: int) -> tuple[int, MappedPage]:
        """Share a fresh zeroed page with ``remote_domid`` (writable); returns (gref, page)."""
        _check_domid(remote_domid)
        h = self._handle("gntshr")
        ref = (c_uint32 * 1)()
        ctypes.set_errno(0)
        address = h.lib.xengntshr_share_pages(h.ptr, remote_domid, 1, ref, 1)
        if not address:
            raise failure(f"xengntshr_share_pages(dom{remote_domid})")
        page = MappedPage(address, None)   # the grant ends with end_grant, not with close
        page._gntshr = (h, address)        # type: ignore[attr-defined]
        self._shared[ref[0]] = page
        return ref[0], page

    def end_grant(self, gref: int) -> None:
        """Stop sharing a page from :meth:`grant_page` (its views are closed first)."""
        page = self._shared.pop(gref, None)
        if page is None:
            raise PlatformError(errno.ENOENT, f"grant reference {gref} was not granted here")
        page.close()
        h, address = page._gntshr          # type: ignore[attr-defined]
        if h.ptr and h.pid == os.getpid() and h.lib.xengntshr_unshare(h.ptr, address, 1) < 0:
            raise failure(f"xengntshr_unshare(gref {gref})")

    def close(self) -> None:
        """End every grant made here and close this process's handles."""
        for gref in list(self._shared):
            self.end_grant(gref)
        for h in self._handles.values():
            h.close()
        self._handles.clear()
