"""Small str-based xenstore client: CRUD, permissions, transactions, watches.

Built on pyxs's connection classes (socket/xenbus discovery and opening), our
own request router (:mod:`~pcibackd.xenstore.router`) and the protocol's
codec (:mod:`~pcibackd.xenstore.codec`).

Threads and fork: every ``XenStore`` owns one router thread, so create it
*after* any fork; an instance inherited through fork refuses to work.

Errors are ``OSError`` with the errno xenstored returned (``FileNotFoundError``
for ENOENT and so on), ``TimeoutError`` when a reply does not arrive within
``timeout`` seconds, and ``ConnectionError`` once the connection is lost.
Values read from xenstore may come from guests: treat them as untrusted.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import TypeVar

from pyxs.connection import UnixSocketConnection, XenBusConnection

from pcibackd.xenstore.codec import Op, check_path, check_perms, check_token, check_watch_path, decode
from pcibackd.xenstore.router import Router

__all__ = ["XenStore", "XsHandle", "Transaction", "TransactionConflict"]

T = TypeVar("T")

_DEFAULT_TIMEOUT = 10.0
_DEFAULT_ATTEMPTS = 16


class TransactionConflict(OSError):
    """A transaction did not commit because of intervening writes (EAGAIN)."""

    def __init__(self, msg: str = "xenstore transaction conflict") -> None:
        super().__init__(errno.EAGAIN, msg)


class XsHandle:
    """Operations shared by the connection and transaction handles."""

    _router: Router
    _tx_id: int
    _timeout: float

    def _call(self, op: int, payload: bytes, path: str | None = None) -> bytes:
        return self._router.request(op, payload, self._tx_id, self._timeout, path)

    def read(self, path: str) -> str | None:
        """Value of ``path``, or None if it does not exist."""
        try:
            return decode(self._call(Op.READ, check_path(path) + b"\0", path))
        except FileNotFoundError:
            return None

    def write(self, path: str, value: str) -> None:
        """Create or overwrite ``path`` (and missing parents) with ``value``."""
        data = check_path(path) + b"\0" + value.encode("utf-8", "surrogateescape")
        self._call(Op.WRITE, data, path)

    def mkdir(self, path: str) -> None:
        """Create ``path`` and missing parents with empty values; no-op if present."""
        self._call(Op.MKDIR, check_path(path) + b"\0", path)

    def rm(self, path: str) -> None:
        """Remove ``path`` and its subtree; no error if it does not exist."""
        try:
            self._call(Op.RM, check_path(path) + b"\0", path)
        except FileNotFoundError:
            pass

    def ls(self, path: str) -> list[str]:
        """Names of the children of ``path``; [] if it does not exist."""
        try:
            raw = self._call(Op.DIRECTORY, check_path(path) + b"\0", path)
        except FileNotFoundError:
            return []
        return [decode(n) for n in raw.split(b"\0") if n]

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        try:
            self._call(Op.GET_PERMS, check_path(path) + b"\0", path)
        except FileNotFoundError:
            return False
        return True

    def get_perms(self, path: str) -> list[str]:
        """Permission strings of ``path``, owner first, e.g. ``["n0", "r5"]``."""
        raw = self._call(Op.GET_PERMS, check_path(path) + b"\0", path)
        return [decode(p) for p in raw.split(b"\0") if p]

    def set_perms(self, path: str, perms: list[str]) -> None:
        """Set permissions: first entry is owner + default access, e.g. ``["n0", "r5"]``."""
        encoded = check_perms(perms)
        data = check_path(path) + b"\0" + encoded
        self._call(Op.SET_PERMS, data, path)


class Transaction(XsHandle):
    """A transaction-bound handle; use as a context manager or commit()/abort()."""

    def __init__(self, router: Router, tx_id: int, timeout: float) -> None:
        self._router = router
        self._tx_id = tx_id
        self._timeout = timeout
        self._open = True

    def _call(self, op: int, payload: bytes, path: str | None = None) -> bytes:
        if not self._open:
            raise RuntimeError("xenstore transaction already ended")
        return self._router.request(op, payload, self._tx_id, self._timeout, path)

    def _end(self, commit: bool) -> bool:
        try:
            self._call(Op.TRANSACTION_END, b"T\0" if commit else b"F\0")
        except OSError as exc:
            if commit and exc.errno == errno.EAGAIN:
                return False
            raise
        finally:
            self._open = False
        return True

    def commit(self) -> bool:
        """Commit; False if it conflicted (EAGAIN): redo everything in a new one."""
        return self._end(True)

    def abort(self) -> None:
        """Discard the transaction's changes."""
        if self._open:
            self._end(False)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._open and not isinstance(exc, ConnectionError):
                try:
                    self.abort()
                except OSError:
                    pass  # the original exception matters more
            return
        if not self.commit():
            raise TransactionConflict()


_instances: weakref.WeakSet[XenStore] = weakref.WeakSet()


def _poison_after_fork() -> None:
    for inst in list(_instances):
        inst._forked = True


os.register_at_fork(after_in_child=_poison_after_fork)


class _Connected:
    """An already-connected stream in the shape the router expects of pyxs's connections."""

    def __init__(self, sock: socket.socket | int) -> None:
        if isinstance(sock, int):
            sock = socket.socket(fileno=sock)
        sock.setblocking(True)
        self.transport = SimpleNamespace(sock=sock)
        self.path = f"fd {sock.fileno()}"

    def connect(self) -> None:
        pass

    def close(self, silent: bool = True) -> None:
        self.transport.sock.close()


class XenStore(XsHandle):
    """A connection to xenstored (its Unix socket, or the xenbus device).

    ``socket_path`` None means $XENSTORED_PATH, then $XENSTORED_RUNDIR/socket,
    then /var/run/xenstored/socket. ``xenbus=True`` uses /dev/xen/xenbus
    instead (``socket_path`` then names the device).  ``sock`` (a connected
    stream socket or its fd, e.g. a worker's end of the xenstore gate) is used
    instead of opening either; the XenStore owns it from then on.  ``timeout``
    bounds every call. Thread-safe; create after any fork.  A lost connection
    makes :meth:`fileno` readable once, with :attr:`connected` False.
    """

    def __init__(
        self, socket_path: str | None = None, *, xenbus: bool = False, timeout: float = _DEFAULT_TIMEOUT,
        sock: socket.socket | int | None = None,
    ) -> None:
        if sock is not None:
            connection = _Connected(sock)
        else:
            connection = XenBusConnection(socket_path) if xenbus else UnixSocketConnection(socket_path)
        self.path = connection.path
        self._timeout = timeout
        self._tx_id = 0
        self._forked = False
        self._events: deque[tuple[str, str]] = deque()
        self._watches: dict[str, frozenset[str]] = {}
        self._signalled = False
        self._event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._router = Router(connection, self._on_event, self._on_lost)
        except BaseException:
            os.close(self._event_fd)
            raise
        self._closed = False
        _instances.add(self)

    def _call(self, op: int, payload: bytes, path: str | None = None) -> bytes:
        if self._forked:
            raise RuntimeError("XenStore inherited across fork; create a new one in the child")
        return self._router.request(op, payload, 0, self._timeout, path)

    # -- transactions --------------------------------------------------------

    def transaction(self) -> Transaction:
        """Start a transaction. As a context manager it commits on success
        (raising TransactionConflict on EAGAIN) and aborts on exception."""
        tx_id = int(self._call(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
        return Transaction(self._router, tx_id, self._timeout)

    def run_transaction(self, fn: Callable[[Transaction], T], attempts: int = _DEFAULT_ATTEMPTS) -> T:
        """Run ``fn(tx)`` in a transaction, retrying it on conflict.

        ``fn`` must be safe to repeat (it re-reads what it depends on). Raises
        TransactionConflict after ``attempts`` conflicting tries.
        """
        for attempt in range(attempts):
            tx = self.transaction()
            try:
                result = fn(tx)
            except OSError as exc:
                if tx._open and not isinstance(exc, ConnectionError):
                    try:
                        tx.abort()
                    except OSError:
                        pass
                if exc.errno != errno.EAGAIN:
                    raise
            except BaseException:
                if tx._open:
                    try:
                        tx.abort()
                    except OSError:
                        pass
                raise
            else:
                if tx.commit():
                    return result
            # Randomised backoff so racing writers stop colliding in lockstep.
            time.sleep(random.uniform(0, 0.001 * (attempt + 1)))
        raise TransactionConflict(f"xenstore transaction conflicted {attempts} times")

    # -- watches -------------------------------------------------------------

    def _on_event(self, payload: bytes) -> None:
        # Router thread. Wake the consumer only on the empty->non-empty edge;
        # events() clears the flag before draining, so nothing is missed.
        parts = payload.split(b"\0")
        if len(parts) < 2:
            return
        self._events.append((decode(parts[0]), decode(parts[1])))
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self._event_fd, 1)

    def _on_lost(self) -> None:
        # Router thread: wake the consumer, who finds ``connected`` False.
        try:
            os.eventfd_write(self._event_fd, 1)
        except OSError:
            pass         # closed meanwhile

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and its subtree. xenstored fires one event for
        ``path`` right away, then one per change (creation, write, removal,
        permission change) of it or any node below it."""
        data = check_watch_path(path) + b"\0" + check_token(token) + b"\0"
        # Register before the request (the first event can beat the reply);
        # copy-on-write so events() never iterates a set being changed.
        previous = self._watches.get(token, frozenset())
        self._watches[token] = previous | {path}
        try:
            self._call(Op.WATCH, data, path)
        except BaseException:
            self._set_watch_paths(token, self._watches.get(token, frozenset()) - ({path} - previous))
            raise

    def unwatch(self, path: str, token: str) -> None:
        """Remove a watch; queued events for it are dropped by events()."""
        data = check_watch_path(path) + b"\0" + check_token(token) + b"\0"
        self._call(Op.UNWATCH, data, path)
        self._set_watch_paths(token, self._watches.get(token, frozenset()) - {path})

    def _set_watch_paths(self, token: str, paths: frozenset[str]) -> None:
        if paths:
            self._watches[token] = paths
        else:
            self._watches.pop(token, None)

    def fileno(self) -> int:
        """An fd that polls readable while watch events are queued."""
        return self._event_fd

    def events(self) -> list[tuple[str, str]]:
        """Drain queued watch events as ``(path, token)`` without blocking.

        Event paths are untrusted (guests can trigger events below watched
        nodes they own). Events of watches removed meanwhile are dropped.
        """
        try:
            os.eventfd_read(self._event_fd)
        except BlockingIOError:
            pass
        self._signalled = False
        out = []
        pop = self._events.popleft
        while True:
            try:
                path, token = pop()
            except IndexError:
                return out
            if self._is_watched(path, token):
                out.append((path, token))

    def _is_watched(self, path: str, token: str) -> bool:
        paths = self._watches.get(token)
        if not paths:
            return False
        if path in paths:
            return True
        return any(w == "/" or path.startswith(w + "/") for w in paths)

    # -- lifetime ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """False once closed or after the connection was lost."""
        return not self._closed and self._router.alive

    def close(self) -> None:
        """Close the connection and stop the router thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _instances.discard(self)
        if not self._forked:  # the router thread does not exist in a forked child
            self._router.close(self._timeout)
        os.close(self._event_fd)

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<XenStore {self.path!r}{'' if self.connected else ' closed'}>"
