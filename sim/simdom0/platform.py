"""A simulated Xen platform: every domain is a plain process on this host.

Grants are shared-memory files and event channels are abstract-namespace
datagram sockets plus a shared port table (:mod:`.evtchn`), so the worker code
that runs on real Xen runs unchanged against simulated guests.  One
simulation instance lives in ``sim_dir`` (put it on tmpfs, e.g. under
/dev/shm, so page writes never reach a disk); independent instances never see
each other.

Layout of ``sim_dir``::

    grants/<granter>/<gref>    page 0: the granted page; page 1: header
                               (magic, granter, grantee)
    grants/<granter>/next      gref allocator, serialised with lockf
    evtchn/<domid>.ports       port table of each domain (see :mod:`.evtchn`)
    pci/                       simulated PCI functions (see :mod:`.hostpci`)
    xen/physdev.json           Xen's PIRQ and MSI state (see :mod:`.physdev`)

A worker maps grants and binds ports after it gave up root (it runs as a uid
of its own): unlike ``/dev/xen``, which it opens before, the simulation's
grant files and port tables are opened by path at map and bind time, so they
are made readable and writable by every uid (0666, in 0755 directories).
A stand-in for tests only: any local process may map any simulated grant.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from pathlib import Path

from pcibackd.platform import atomic
from pcibackd.platform.api import PlatformError
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import PAGE_SIZE
from simdom0.drivers import SimDrivers
from simdom0.evtchn import NR_PORTS, PortSpace, SimEventChannel, check_domid, locked, shared_dir
from simdom0.hostpci import SimDevice, SimHost, open_files
from simdom0.physdev import SimPhysdev

__all__ = ["FIRST_GREF", "NR_PORTS", "SimEventChannel", "SimPlatform", "SimSharedPage"]

FIRST_GREF = 8             # Xen reserves the first 8 grant entries

_GRANT_HEADER = struct.Struct("<4sII")
_GRANT_MAGIC = b"PBSG"


BOOT_OPTIONS = "boot.json"
DEFAULT_EXTRA_GUEST_IRQS = 32


def physdev_state_path(sim_dir: Path | str) -> Path:
    """Where the simulated Xen keeps its PIRQ state (tests read it)."""
    return Path(sim_dir) / "xen" / "physdev.json"


class SimSharedPage(atomic.PageBits):
    """A 4 KiB page of a grant file, mapped MAP_SHARED."""

    def __init__(self, fd: int):
        self._mmap = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self._mmap)
        self._bit_base, self._anchor = atomic.buffer_address(self._mmap)

    def close(self) -> None:
        """Unmap; if callers still hold slices of ``buf`` the mapping lives
        until they are gone."""
        if self._mmap is None:
            return
        self._bit_base = self._anchor = None   # drop the ctypes pin first
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            pass
        self._mmap = None

    def __enter__(self) -> SimSharedPage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SimPlatform:
    """The simulated platform of one domain in the instance at ``sim_dir``."""

    name = "sim"

    def __init__(self, sim_dir: Path | str, domid: int):
        self.domid = check_domid(domid)
        self.sim_dir = Path(sim_dir)
        self._ports = PortSpace(self.sim_dir)
        shared_dir(self.sim_dir / "grants")

    @classmethod
    def from_spec(cls, arg: str | None, domid: int) -> SimPlatform:
        """Platform spec ``sim:DIR``: the simulated dom0 whose state is in DIR."""
        if not arg:
            raise ValueError("platform sim needs its state directory: --platform sim:DIR")
        return cls(arg, domid)

    @staticmethod
    def worker_paths(arg: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """A worker reads the simulated devices' attributes and writes grant mappings and port
        tables; never the devices' config files (it gets those as descriptors)."""
        sim = Path(arg)
        return (str(sim / "pci"),), (str(sim / "grants"), str(sim / "evtchn")), ()

    def open_handles(self) -> None:
        """Nothing to open early: grant files are opened by path, and every uid may (0666)."""

    # -- host PCI ------------------------------------------------------------

    def open_device(self, bdf: BDF) -> SimDevice:
        """A simulated function of this instance (FileNotFoundError if it has none at ``bdf``)."""
        return SimDevice.open(self.sim_dir / "pci", bdf)

    def open_device_files(self, bdf: BDF, writable: bool = True) -> dict[str, int]:
        """The descriptors of a simulated function's files, for a worker that may not open them."""
        return open_files(self.sim_dir / "pci", bdf, writable)

    def device_from_files(self, bdf: BDF, files: dict[str, int], writable: bool = True) -> SimDevice:
        """The function over descriptors from :meth:`open_device_files` (taken over)."""
        return SimDevice(self.sim_dir / "pci", bdf, files)

    def assignable(self) -> list[BDF]:
        """Every simulated function of this instance."""
        root = self.sim_dir / "pci"
        return SimHost(root).devices() if root.exists() else []

    def host_drivers(self, state_dir: Path | str) -> SimDrivers:
        """Driver binding, in-use probe and quarantine of the simulated functions (see :mod:`.drivers`)."""
        return SimDrivers(self.sim_dir / "pci")

    def physdev(self) -> SimPhysdev:
        """Xen's PIRQ/MSI side (the supervisor's); its state is kept in ``xen/physdev.json``.

        ``xen/boot.json`` may hold Xen boot options of the simulated host:
        ``{"extra_guest_irqs": N}`` (Xen's default 32) sizes each guest's PIRQ pool.
        """
        xen = self.sim_dir / "xen"
        xen.mkdir(exist_ok=True)
        try:
            boot = json.loads((xen / BOOT_OPTIONS).read_text())
        except FileNotFoundError:
            boot = {}
        extra = boot.get("extra_guest_irqs", DEFAULT_EXTRA_GUEST_IRQS)
        if type(extra) is not int or not 0 < extra <= 4096:
            raise ValueError(f"{xen / BOOT_OPTIONS}: extra_guest_irqs must be 1..4096, not {extra!r}")
        return SimPhysdev(self.open_device, assume_assigned=True, extra_guest_irqs=extra,
                          state_file=physdev_state_path(self.sim_dir))

    # -- grants ------------------------------------------------------------

    def grant_page(self, remote_domid: int) -> tuple[int, SimSharedPage]:
        """Grant a fresh zeroed page to ``remote_domid``."""
        check_domid(remote_domid)
        grants = self._grant_dir(self.domid)
        shared_dir(grants)
        gref = self._next_gref(grants)
        staging = grants / f".new-{gref}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o666)        # the mapping worker runs as a uid of its own
            os.ftruncate(fd, 2 * PAGE_SIZE)
            os.pwrite(fd, _GRANT_HEADER.pack(_GRANT_MAGIC, self.domid, remote_domid), PAGE_SIZE)
            page = SimSharedPage(fd)
            # Published complete: a mapper never sees a half-written header.
            os.rename(staging, grants / str(gref))
        except BaseException:
            os.unlink(staging)
            raise
        finally:
            os.close(fd)
        return gref, page

    def map_grant(self, remote_domid: int, gref: int) -> SimSharedPage:
        """Map page ``gref`` that ``remote_domid`` granted to this domain."""
        check_domid(remote_domid)
        if type(gref) is not int or not 0 <= gref < 2**32:
            raise PlatformError(errno.EINVAL, f"invalid grant reference {gref!r}")
        try:
            fd = os.open(self._grant_dir(remote_domid) / str(gref), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PlatformError(errno.ENOENT, f"domain {remote_domid} has no grant {gref}") from None
        try:
            header = os.pread(fd, _GRANT_HEADER.size, PAGE_SIZE)
            if len(header) != _GRANT_HEADER.size:
                raise PlatformError(errno.EINVAL, f"grant {gref} of domain {remote_domid} is corrupt")
            magic, granter, grantee = _GRANT_HEADER.unpack(header)
            if magic != _GRANT_MAGIC or granter != remote_domid:
                raise PlatformError(errno.EINVAL, f"grant {gref} of domain {remote_domid} is corrupt")
            if grantee != self.domid:
                raise PlatformError(errno.EPERM,
                                    f"grant {gref} of domain {remote_domid} is not for domain {self.domid}")
            return SimSharedPage(fd)
        finally:
            os.close(fd)

    def end_grant(self, gref: int) -> None:
        """Revoke ``gref``; existing mappings stay valid, as on Xen."""
        if type(gref) is not int or gref < 0:
            raise PlatformError(errno.EINVAL, f"invalid grant reference {gref!r}")
        try:
            os.unlink(self._grant_dir(self.domid) / str(gref))
        except FileNotFoundError:
            raise PlatformError(errno.EINVAL, f"grant {gref} is not active") from None

    # -- event channels ----------------------------------------------------

    def open_evtchn(self) -> SimEventChannel:
        """A new event-channel handle of this domain."""
        return SimEventChannel(self._ports, self.domid)

    # -- internals ---------------------------------------------------------

    def _grant_dir(self, domid: int) -> Path:
        return self.sim_dir / "grants" / str(domid)

    @staticmethod
    def _next_gref(grants: Path) -> int:
        fd = os.open(grants / "next", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with locked(fd, 0, 0):
                gref = int(os.pread(fd, 16, 0) or FIRST_GREF)
                if gref >= 2**32:
                    raise PlatformError(errno.ENOSPC, "grant references exhausted")
                os.pwrite(fd, b"%-15d" % (gref + 1), 0)
        finally:
            os.close(fd)
        return gref
