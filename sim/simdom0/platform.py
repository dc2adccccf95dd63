"""A simulated Xen platform: every domain is a plain process on this host.

Grants are shared-memory files, event channels are abstract-namespace datagram
sockets plus a shared port table, so the worker code that runs on real Xen
runs unchanged against simulated guests.  One simulation instance lives in
``sim_dir`` (put it on tmpfs, e.g. under /dev/shm, so page writes never reach
a disk); independent instances never see each other.

Layout of ``sim_dir``::

    grants/<granter>/<gref>    page 0: the granted page; page 1: header
                               (magic, granter, grantee)
    grants/<granter>/next      gref allocator, serialised with lockf
    evtchn/<domid>.ports       port table, per port one binding word
                               (state | remote domid | remote port) and one
                               pending word, mapped by every party

A port is owned by whoever binds the abstract socket
``\\0pcibackd-sim/<instance>/evtchn/<domid>/<port>``; the kernel releases the
name when the owner dies (kill -9 included), which is how crashed backends are
detected.  A binder writes both ends' binding words, so the port owner never
has to run to be bound.  ``notify`` sets the peer's pending word atomically
and sends a wake-up datagram only on its 0 -> 1 edge, so a flood costs the
receiver O(1), like Xen's pending bitmap.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import select
import socket
import struct
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

from pcibackd.platform import atomic
from pcibackd.platform.api import PlatformError
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import PAGE_SIZE
from simdom0.hostpci import SimDevice, SimHost

NR_PORTS = 4096            # the 2-level event channel ABI limit on 64-bit
DOMID_FIRST_RESERVED = 0x7FF0
FIRST_GREF = 8             # Xen reserves the first 8 grant entries

_FREE, _UNBOUND, _INTERDOMAIN = 0, 1, 2
_SLOT_BYTES = 8            # binding word + pending word
_TABLE_BYTES = NR_PORTS * _SLOT_BYTES
_GRANT_HEADER = struct.Struct("<4sII")
_GRANT_MAGIC = b"PBSG"
_SOCK_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
# Burst of spurious wake-ups handled per pending() call before yielding.
_MAX_SPURIOUS = 64

# lockf locks belong to the process, so threads also need a process lock.
_thread_lock = threading.Lock()
_open_channels: weakref.WeakSet[SimEventChannel] = weakref.WeakSet()


def _binding(state: int, domid: int, port: int) -> int:
    return state << 28 | domid << 12 | port


def _unpack_binding(word: int) -> tuple[int, int, int]:
    return word >> 28, word >> 12 & 0xFFFF, word & 0xFFF


def _check_domid(domid: object) -> int:
    if type(domid) is not int or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise PlatformError(errno.EINVAL, f"invalid domid {domid!r}")
    return domid


def _check_port(port: object) -> int:
    if type(port) is not int or not 0 < port < NR_PORTS:
        raise PlatformError(errno.EINVAL, f"invalid event channel port {port!r}")
    return port


@contextmanager
def _locked(fd: int, start: int, length: int):
    with _thread_lock:
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, length, start)


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


class _PortTable:
    """One domain's port table, mapped shared by everyone talking to it."""

    def __init__(self, fd: int):
        self.fd = fd
        self._mmap = mmap.mmap(fd, _TABLE_BYTES, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        # Aligned 32-bit loads/stores through a native-format view are single
        # instructions, so readers never see a torn binding word.
        self.words = memoryview(self._mmap).cast("I")
        self._base, self._anchor = atomic.buffer_address(self._mmap)

    @classmethod
    def open(cls, path: Path, create: bool) -> _PortTable | None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_size < _TABLE_BYTES:
            if not create:    # its creator has not sized it yet
                os.close(fd)
                return None
            os.ftruncate(fd, _TABLE_BYTES)
        return cls(fd)

    def binding(self, port: int) -> int:
        return self.words[2 * port]

    def pending_address(self, port: int) -> int:
        return self._base + port * _SLOT_BYTES + 4

    def lock(self, port: int):
        return _locked(self.fd, port * _SLOT_BYTES, _SLOT_BYTES)

    def reset(self, port: int, binding: int) -> None:
        """Give a freshly owned (or released) port its binding; caller locks."""
        atomic.fetch_and(self.pending_address(port), 0)
        self.words[2 * port] = binding


class SimEventChannel:
    """One event-channel handle; ``fileno()`` is an epoll fd over its ports.

    Not thread-safe.  A forked child gets a closed copy: inherited sockets
    would otherwise keep the parent's ports alive after the parent died.
    """

    def __init__(self, platform: SimPlatform):
        self._platform = platform
        self._domid = platform.domid
        self._table = platform._port_table(platform.domid, create=True)
        self._words = self._table.words
        self._epoll = select.epoll()
        self._ports: dict[int, tuple[socket.socket, int, bytes]] = {}  # sock, pending addr, own name
        self._by_fd: dict[int, tuple[int, socket.socket, int]] = {}    # port, sock, pending addr
        self._routes: dict[int, tuple] = {}
        self._masked: set[int] = set()
        self._closed = False
        _open_channels.add(self)

    def fileno(self) -> int:
        self._check_open()
        return self._epoll.fileno()

    def alloc_unbound(self, remote_domid: int) -> int:
        self._check_open()
        return self._allocate(_binding(_UNBOUND, _check_domid(remote_domid), 0))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        self._check_open()
        _check_domid(remote_domid)
        _check_port(remote_port)
        remote = self._platform._port_table(remote_domid, create=False)
        if remote is None:
            raise PlatformError(errno.ESRCH, f"domain {remote_domid} has no event channels")
        port = self._allocate(_binding(_INTERDOMAIN, remote_domid, remote_port))
        try:
            with remote.lock(remote_port):
                if not self._bindable(remote, remote_domid, remote_port, port):
                    raise PlatformError(
                        errno.EINVAL,
                        f"port {remote_port} of domain {remote_domid} is not unbound for domain {self._domid}")
                remote.words[2 * remote_port] = _binding(_INTERDOMAIN, self._domid, port)
        except BaseException:
            self._release(port)
            raise
        # Xen marks the new local port pending: events sent to the unbound
        # port before the bind are lost, so the backend must look once.
        sock, pending_address, name = self._ports[port]
        atomic.fetch_or(pending_address, 1)
        self._wake(sock, name)
        return port

    def notify(self, port: int) -> None:
        if self._closed:
            self._check_open()
        try:
            sock = self._ports[port][0]
        except (KeyError, TypeError):
            raise PlatformError(errno.EINVAL, f"port {port!r} is not bound by this handle") from None
        binding = self._words[2 * port]
        route = self._routes.get(port)
        if route is None or route[0] != binding:
            route = self._route(port, binding)
            if route is None:
                return    # unbound: Xen drops the event
        _, peer_words, peer_index, expected, peer_pending, peer_name = route
        # The peer slot must still point back at us: a dead peer's port number
        # may have been reused for someone else's channel.
        if peer_words[peer_index] != expected:
            return
        if atomic.fetch_or(peer_pending, 1) & 1:
            return        # already pending: the peer has its wake-up
        self._wake(sock, peer_name)

    def pending(self) -> int | None:
        if self._closed:
            self._check_open()
        for _ in range(_MAX_SPURIOUS):
            ready = self._epoll.poll(0, 1)
            if not ready:
                return None
            port, sock, pending_address = self._by_fd[ready[0][0]]
            try:
                sock.recv(1)
            except BlockingIOError:
                pass
            if port in self._masked:
                continue      # latched: the pending word stays set until unmask
            if atomic.fetch_and(pending_address, 0) & 1:
                self._masked.add(port)
                return port
        return None

    def unmask(self, port: int) -> None:
        self._check_open()
        sock, pending_address, name = self._owned(port)
        self._masked.discard(port)
        # A plain load suffices: a notify that our load misses sends its own
        # wake-up, as it saw the 0 -> 1 edge.
        if self._words[2 * port + 1] & 1:
            self._wake(sock, name)    # re-arm our own readiness for the latched event

    def unbind(self, port: int) -> None:
        self._check_open()
        self._owned(port)
        self._release(port)

    def close(self) -> None:
        if self._closed:
            return
        for port in list(self._ports):
            self._release(port)
        self._epoll.close()
        self._closed = True

    def __enter__(self) -> SimEventChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PlatformError(errno.EBADF, "event channel handle is closed")

    def _owned(self, port: int) -> tuple[socket.socket, int, bytes]:
        try:
            return self._ports[port]
        except (KeyError, TypeError):
            raise PlatformError(errno.EINVAL, f"port {port!r} is not bound by this handle") from None

    def _allocate(self, binding: int) -> int:
        """Own the lowest free port (the first socket name that binds)."""
        sock = socket.socket(socket.AF_UNIX, _SOCK_FLAGS)
        try:
            for port in range(1, NR_PORTS):
                name = self._platform._port_name(self._domid, port)
                try:
                    sock.bind(name)
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        continue
                    raise
                with self._table.lock(port):
                    self._table.reset(port, binding)
                break
            else:
                raise PlatformError(errno.ENOSPC, "no free event channel port")
        except BaseException:
            sock.close()
            raise
        pending_address = self._table.pending_address(port)
        self._ports[port] = (sock, pending_address, name)
        self._by_fd[sock.fileno()] = (port, sock, pending_address)
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        return port

    def _release(self, port: int) -> None:
        sock, _, _ = self._ports.pop(port)
        # Free the slot before the name, or a new owner's binding is clobbered.
        with self._table.lock(port):
            self._table.reset(port, _binding(_FREE, 0, 0))
        del self._by_fd[sock.fileno()]
        self._epoll.unregister(sock.fileno())
        sock.close()
        self._routes.pop(port, None)
        self._masked.discard(port)

    def _bindable(self, remote: _PortTable, remote_domid: int, remote_port: int,
                  local_port: int) -> bool:
        state, peer_domid, peer_port = _unpack_binding(remote.binding(remote_port))
        if peer_domid != self._domid or not self._platform._alive(remote_domid, remote_port):
            return False
        if state == _UNBOUND:
            return True
        # Xen turns a port back to unbound when its peer closes; a peer that
        # was killed never closed, so a dead or re-used peer counts as closed.
        return state == _INTERDOMAIN and (
            peer_port == local_port
            or not self._platform._bound_to(self._domid, peer_port, remote_domid, remote_port))

    def _route(self, port: int, binding: int) -> tuple | None:
        state, peer_domid, peer_port = _unpack_binding(binding)
        if state != _INTERDOMAIN:
            return None
        peer = self._platform._port_table(peer_domid, create=False)
        if peer is None:
            return None
        route = (binding, peer.words, 2 * peer_port, _binding(_INTERDOMAIN, self._domid, port),
                 peer.pending_address(peer_port), self._platform._port_name(peer_domid, peer_port))
        self._routes[port] = route
        return route

    @staticmethod
    def _wake(sock: socket.socket, name: bytes) -> None:
        try:
            sock.sendto(b"", name)
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
            pass    # peer gone (Xen: no error), or its queue already wakes it

    def _forget_inherited(self) -> None:
        """In a forked child: drop the fds without touching shared state, so
        the parent's ports still vanish when the parent dies."""
        for sock, _, _ in self._ports.values():
            sock.close()
        self._ports.clear()
        self._by_fd.clear()
        self._epoll.close()
        self._closed = True


def _forget_inherited_channels() -> None:
    for channel in list(_open_channels):
        channel._forget_inherited()


os.register_at_fork(after_in_child=_forget_inherited_channels)


class SimPlatform:
    """The simulated platform of one domain in the instance at ``sim_dir``."""

    name = "sim"

    def __init__(self, sim_dir: Path | str, domid: int):
        self.domid = _check_domid(domid)
        self.sim_dir = Path(sim_dir)
        (self.sim_dir / "evtchn").mkdir(parents=True, exist_ok=True)
        (self.sim_dir / "grants").mkdir(exist_ok=True)
        digest = hashlib.sha256(os.fsencode(self.sim_dir.resolve())).hexdigest()[:16]
        self._name_prefix = b"\0pcibackd-sim/" + digest.encode() + b"/evtchn/"
        self._tables: dict[int, _PortTable] = {}

    @classmethod
    def from_spec(cls, arg: str | None, domid: int) -> SimPlatform:
        """Platform spec ``sim:DIR``: the simulated dom0 whose state is in DIR."""
        if not arg:
            raise ValueError("platform sim needs its state directory: --platform sim:DIR")
        return cls(arg, domid)

    # -- host PCI ------------------------------------------------------------

    def open_device(self, bdf: BDF) -> SimDevice:
        """A simulated function of this instance (FileNotFoundError if it has none at ``bdf``)."""
        return SimDevice.open(self.sim_dir / "pci", bdf)

    def assignable(self) -> list[BDF]:
        """Every simulated function of this instance."""
        root = self.sim_dir / "pci"
        return SimHost(root).devices() if root.exists() else []

    # -- grants ------------------------------------------------------------

    def grant_page(self, remote_domid: int) -> tuple[int, SimSharedPage]:
        """Grant a fresh zeroed page to ``remote_domid``."""
        _check_domid(remote_domid)
        grants = self._grant_dir(self.domid)
        grants.mkdir(exist_ok=True)
        gref = self._next_gref(grants)
        staging = grants / f".new-{gref}"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
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
        _check_domid(remote_domid)
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
        return SimEventChannel(self)

    # -- internals ---------------------------------------------------------

    def _grant_dir(self, domid: int) -> Path:
        return self.sim_dir / "grants" / str(domid)

    @staticmethod
    def _next_gref(grants: Path) -> int:
        fd = os.open(grants / "next", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with _locked(fd, 0, 0):
                gref = int(os.pread(fd, 16, 0) or FIRST_GREF)
                if gref >= 2**32:
                    raise PlatformError(errno.ENOSPC, "grant references exhausted")
                os.pwrite(fd, b"%-15d" % (gref + 1), 0)
        finally:
            os.close(fd)
        return gref

    def _port_table(self, domid: int, create: bool) -> _PortTable | None:
        table = self._tables.get(domid)
        if table is None:
            table = _PortTable.open(self.sim_dir / "evtchn" / f"{domid}.ports", create)
            if table is not None:
                self._tables[domid] = table
        return table

    def _port_name(self, domid: int, port: int) -> bytes:
        return self._name_prefix + b"%d/%d" % (domid, port)

    def _alive(self, domid: int, port: int) -> bool:
        """Whether some live process owns ``port`` of ``domid``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
            try:
                probe.connect(self._port_name(domid, port))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
        return True

    def _bound_to(self, domid: int, port: int, remote_domid: int, remote_port: int) -> bool:
        """Whether a live ``port`` of ``domid`` is bound to the remote port."""
        table = self._port_table(domid, create=False)
        return (table is not None and self._alive(domid, port)
                and table.binding(port) == _binding(_INTERDOMAIN, remote_domid, remote_port))
