"""Simulated event channels: abstract-namespace datagram sockets plus shared port tables.

Each domain of a simulation instance has a port table, ``evtchn/<domid>.ports``
under the instance directory: per port one binding word (state | remote
domid | remote port) and one pending word, mapped by every party.

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
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

from pcibackd.platform import atomic
from pcibackd.platform.api import PlatformError

NR_PORTS = 4096            # the 2-level event channel ABI limit on 64-bit
DOMID_FIRST_RESERVED = 0x7FF0

_FREE, _UNBOUND, _INTERDOMAIN = 0, 1, 2
_SLOT_BYTES = 8            # binding word + pending word
_TABLE_BYTES = NR_PORTS * _SLOT_BYTES
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


def shared_dir(path: Path) -> None:
    """Make directory ``path`` (and parents) if missing, searchable by every uid (0755)."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(path, 0o755)     # whatever the umask: a worker under its own uid opens files here
        except PermissionError:
            pass


def check_domid(domid: object) -> int:
    """``domid`` if it names an ordinary domain, else PlatformError(EINVAL)."""
    if type(domid) is not int or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise PlatformError(errno.EINVAL, f"invalid domid {domid!r}")
    return domid


def _check_port(port: object) -> int:
    if type(port) is not int or not 0 < port < NR_PORTS:
        raise PlatformError(errno.EINVAL, f"invalid event channel port {port!r}")
    return port


@contextmanager
def locked(fd: int, start: int, length: int):
    """Hold a lockf lock on ``length`` bytes at ``start`` of ``fd`` (0: to the end),
    excluding other processes and the other threads of this one."""
    with _thread_lock:
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, length, start)


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
            os.fchmod(fd, 0o666)      # workers (each a uid of its own) bind and notify through it
            os.ftruncate(fd, _TABLE_BYTES)
        return cls(fd)

    def binding(self, port: int) -> int:
        return self.words[2 * port]

    def pending_address(self, port: int) -> int:
        return self._base + port * _SLOT_BYTES + 4

    def lock(self, port: int):
        return locked(self.fd, port * _SLOT_BYTES, _SLOT_BYTES)

    def reset(self, port: int, binding: int) -> None:
        """Give a freshly owned (or released) port its binding; caller locks."""
        atomic.fetch_and(self.pending_address(port), 0)
        self.words[2 * port] = binding


class PortSpace:
    """The event-channel namespace of one simulation instance (its port tables and names)."""

    def __init__(self, sim_dir: Path):
        self._dir = sim_dir / "evtchn"
        shared_dir(self._dir)
        digest = hashlib.sha256(os.fsencode(sim_dir.resolve())).hexdigest()[:16]
        self._name_prefix = b"\0pcibackd-sim/" + digest.encode() + b"/evtchn/"
        self._tables: dict[int, _PortTable] = {}

    def table(self, domid: int, create: bool) -> _PortTable | None:
        """The port table of ``domid`` (None if it has none and ``create`` is False)."""
        table = self._tables.get(domid)
        if table is None:
            table = _PortTable.open(self._dir / f"{domid}.ports", create)
            if table is not None:
                self._tables[domid] = table
        return table

    def name(self, domid: int, port: int) -> bytes:
        """The abstract socket name whose owner owns ``port`` of ``domid``."""
        return self._name_prefix + b"%d/%d" % (domid, port)

    def alive(self, domid: int, port: int) -> bool:
        """Whether some live process owns ``port`` of ``domid``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
            try:
                probe.connect(self.name(domid, port))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
        return True

    def bound_to(self, domid: int, port: int, remote_domid: int, remote_port: int) -> bool:
        """Whether a live ``port`` of ``domid`` is bound to the remote port."""
        table = self.table(domid, create=False)
        return (table is not None and self.alive(domid, port)
                and table.binding(port) == _binding(_INTERDOMAIN, remote_domid, remote_port))


class SimEventChannel:
    """One event-channel handle of domain ``domid``; ``fileno()`` is an epoll fd over its ports.

    Not thread-safe.  A forked child gets a closed copy: inherited sockets
    would otherwise keep the parent's ports alive after the parent died.
    """

    def __init__(self, ports: PortSpace, domid: int):
        self._space = ports
        self._domid = domid
        self._table = ports.table(domid, create=True)
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
        return self._allocate(_binding(_UNBOUND, check_domid(remote_domid), 0))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        self._check_open()
        check_domid(remote_domid)
        _check_port(remote_port)
        remote = self._space.table(remote_domid, create=False)
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
                name = self._space.name(self._domid, port)
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
        if peer_domid != self._domid or not self._space.alive(remote_domid, remote_port):
            return False
        if state == _UNBOUND:
            return True
        # Xen turns a port back to unbound when its peer closes; a peer that
        # was killed never closed, so a dead or re-used peer counts as closed.
        return state == _INTERDOMAIN and (
            peer_port == local_port
            or not self._space.bound_to(self._domid, peer_port, remote_domid, remote_port))

    def _route(self, port: int, binding: int) -> tuple | None:
        state, peer_domid, peer_port = _unpack_binding(binding)
        if state != _INTERDOMAIN:
            return None
        peer = self._space.table(peer_domid, create=False)
        if peer is None:
            return None
        route = (binding, peer.words, 2 * peer_port, _binding(_INTERDOMAIN, self._domid, port),
                 peer.pending_address(peer_port), self._space.name(peer_domid, peer_port))
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
