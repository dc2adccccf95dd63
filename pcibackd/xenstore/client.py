"""Small str-based xenstore client: CRUD, permissions, transactions, watches.

Built on pyxs's connection classes (socket/xenbus discovery and opening) and
its wire constants. The request router is our own because pyxs's has no
per-call timeout, leaves callers blocked forever when its thread dies (pyxs
issue #11) and uses select(), which fails for fds >= 1024.

Threads and fork: every ``XenStore`` owns one router thread, so create it
*after* any fork; an instance inherited through fork refuses to work.

Errors are ``OSError`` with the errno xenstored returned (``FileNotFoundError``
for ENOENT and so on), ``TimeoutError`` when a reply does not arrive within
``timeout`` seconds, and ``ConnectionError`` once the connection is lost.
Values read from xenstore may come from guests: treat them as untrusted.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import re
import select
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from pyxs._internal import Op
from pyxs.connection import UnixSocketConnection, XenBusConnection
from pyxs.exceptions import ConnectionError as PyxsConnectionError

__all__ = ["XenStore", "XsHandle", "Transaction", "TransactionConflict"]

T = TypeVar("T")

_HEADER = struct.Struct("=IIII")  # xsd_sockmsg: type, req_id, tx_id, len
_PAYLOAD_MAX = 4096
_PATH_RE = re.compile(r"[A-Za-z0-9_@/-]+")
_SPECIAL_WATCHES = frozenset({"@introduceDomain", "@releaseDomain"})
_PERM_RE = re.compile(r"[wrbn][0-9]+")
_DEFAULT_TIMEOUT = 10.0
_DEFAULT_ATTEMPTS = 16


class TransactionConflict(OSError):
    """A transaction did not commit because of intervening writes (EAGAIN)."""

    def __init__(self, msg: str = "xenstore transaction conflict") -> None:
        super().__init__(errno.EAGAIN, msg)


def _check_path(path: str) -> bytes:
    """Encode a path, rejecting what xenstored would reject anyway."""
    limit = 3072 if path.startswith("/") else 2048
    if (
        not _PATH_RE.fullmatch(path)
        or len(path) > limit
        or "//" in path
        or (len(path) > 1 and path.endswith("/"))
    ):
        raise ValueError(f"invalid xenstore path {path!r}")
    return path.encode("ascii")


def _check_watch_path(path: str) -> bytes:
    if path.startswith("@") and path not in _SPECIAL_WATCHES:
        raise ValueError(f"invalid special watch path {path!r}")
    return _check_path(path)


def _check_token(token: str) -> bytes:
    if not token or "\0" in token:
        raise ValueError(f"invalid watch token {token!r}")
    return token.encode("ascii")


def _decode(raw: bytes) -> str:
    # Guest-written bytes need not be UTF-8; surrogateescape keeps them
    # round-trippable instead of raising inside the caller.
    return raw.decode("utf-8", "surrogateescape")


def _error(code_name: bytes, path: str | None) -> OSError:
    name = code_name.rstrip(b"\0").decode("ascii", "replace")
    code = getattr(errno, name, None) if name.startswith("E") else None
    if not isinstance(code, int):
        return OSError(errno.EIO, f"xenstore error {name!r}", path)
    return OSError(code, os.strerror(code), path)


class _Reply:
    """One outstanding request: a pre-acquired lock the router releases."""

    __slots__ = ("lock", "packet")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.packet: tuple[int, int, bytes] | None = None  # (op, tx_id, payload)


_LOST = (-1, 0, b"")  # packet handed to waiters when the connection dies


class _Router:
    """Owns the connection; a daemon thread routes replies and watch events."""

    def __init__(self, connection, on_event: Callable[[bytes], None]) -> None:
        try:
            connection.connect()
        except PyxsConnectionError as exc:
            cause = exc.__context__
            code = getattr(cause, "errno", None) or errno.ECONNREFUSED
            raise OSError(code, f"cannot connect to xenstore at {connection.path}: {cause or exc}") from exc
        transport = connection.transport
        self._connection = connection
        sock = getattr(transport, "sock", None)
        if sock is not None:
            self._fd = sock.fileno()
            self._send = sock.sendall
            self._recv = sock.recv
        else:  # xenbus device
            self._fd = transport.fileno()
            self._send = self._write_all
            self._recv = lambda n: os.read(self._fd, n)
        self._on_event = on_event
        self._pending: dict[int, _Reply] = {}
        self._abandoned: set[int] = set()  # timed-out requests whose reply may still come
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xenstore-router", daemon=True)
        self._thread.start()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def request(self, op: int, payload: bytes, tx_id: int, timeout: float, path: str | None) -> bytes:
        if len(payload) > _PAYLOAD_MAX:
            raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {_PAYLOAD_MAX}")
        reply = _Reply()
        rq_id = next(self._ids) & 0xFFFFFFFF
        with self._lock:
            if self.error is not None:
                raise ConnectionError(errno.ENOTCONN, f"xenstore connection lost: {self.error}")
            self._pending[rq_id] = reply
            try:
                self._send(_HEADER.pack(op, rq_id, tx_id, len(payload)) + payload)
            except OSError as exc:
                # A stream with a failed send is unusable: fail everyone now.
                del self._pending[rq_id]
                self.error = exc
                self._wake()
                raise ConnectionError(exc.errno or errno.EPIPE, f"xenstore send failed: {exc}") from exc
        if not reply.lock.acquire(timeout=timeout):
            with self._lock:
                if self._pending.pop(rq_id, None) is not None:
                    self._abandoned.add(rq_id)
            if reply.packet is None:
                raise TimeoutError(errno.ETIMEDOUT, f"no xenstore reply within {timeout}s", path)
        r_op, r_tx, r_payload = reply.packet
        if r_op == Op.ERROR:
            raise _error(r_payload, path)
        if r_op == _LOST[0]:
            raise ConnectionError(errno.ENOTCONN, f"xenstore connection lost: {self.error}")
        if r_op != op or r_tx != tx_id:
            raise OSError(errno.EPROTO, f"unexpected xenstore reply op={r_op} tx={r_tx}", path)
        return r_payload

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        buf = b""
        try:
            while True:
                ready = poller.poll()
                if any(fd == self._wake_r for fd, _ in ready):
                    break
                chunk = self._recv(65536)
                if not chunk:
                    raise ConnectionError(errno.ECONNRESET, "xenstored closed the connection")
                buf += chunk
                while len(buf) >= _HEADER.size:
                    op, rq_id, tx_id, size = _HEADER.unpack_from(buf)
                    if size > _PAYLOAD_MAX:  # desynchronised stream: nothing after it is trustworthy
                        raise OSError(errno.EPROTO, f"xenstore packet of {size} bytes")
                    end = _HEADER.size + size
                    if len(buf) < end:
                        break
                    payload, buf = buf[_HEADER.size:end], buf[end:]
                    self._dispatch(op, rq_id, tx_id, payload)
        except BaseException as exc:  # noqa: BLE001 - recorded and reported to every caller
            self.error = exc
        finally:
            with self._lock:
                if self.error is None:
                    self.error = ConnectionError(errno.ENOTCONN, "xenstore client closed")
                pending, self._pending = self._pending, {}
            for reply in pending.values():
                reply.packet = _LOST
                reply.lock.release()

    def _dispatch(self, op: int, rq_id: int, tx_id: int, payload: bytes) -> None:
        if op == Op.WATCH_EVENT:
            self._on_event(payload)
            return
        with self._lock:
            reply = self._pending.pop(rq_id, None)
            if reply is None:
                if rq_id in self._abandoned:
                    self._abandoned.discard(rq_id)
                    return
                raise OSError(errno.EPROTO, f"xenstore reply for unknown request {rq_id} (op {op})")
        reply.packet = (op, tx_id, payload)
        reply.lock.release()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # pipe full: the router is being woken anyway

    def close(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._wake()
            self._thread.join(timeout)
        self._connection.close(silent=True)
        os.close(self._wake_r)
        os.close(self._wake_w)


class XsHandle:
    """Operations shared by the connection and transaction handles."""

    _router: _Router
    _tx_id: int
    _timeout: float

    def _call(self, op: int, payload: bytes, path: str | None = None) -> bytes:
        return self._router.request(op, payload, self._tx_id, self._timeout, path)

    def read(self, path: str) -> str | None:
        """Value of ``path``, or None if it does not exist."""
        try:
            return _decode(self._call(Op.READ, _check_path(path) + b"\0", path))
        except FileNotFoundError:
            return None

    def write(self, path: str, value: str) -> None:
        """Create or overwrite ``path`` (and missing parents) with ``value``."""
        data = _check_path(path) + b"\0" + value.encode("utf-8", "surrogateescape")
        self._call(Op.WRITE, data, path)

    def mkdir(self, path: str) -> None:
        """Create ``path`` and missing parents with empty values; no-op if present."""
        self._call(Op.MKDIR, _check_path(path) + b"\0", path)

    def rm(self, path: str) -> None:
        """Remove ``path`` and its subtree; no error if it does not exist."""
        try:
            self._call(Op.RM, _check_path(path) + b"\0", path)
        except FileNotFoundError:
            pass

    def ls(self, path: str) -> list[str]:
        """Names of the children of ``path``; [] if it does not exist."""
        try:
            raw = self._call(Op.DIRECTORY, _check_path(path) + b"\0", path)
        except FileNotFoundError:
            return []
        return [_decode(n) for n in raw.split(b"\0") if n]

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists."""
        try:
            self._call(Op.GET_PERMS, _check_path(path) + b"\0", path)
        except FileNotFoundError:
            return False
        return True

    def get_perms(self, path: str) -> list[str]:
        """Permission strings of ``path``, owner first, e.g. ``["n0", "r5"]``."""
        raw = self._call(Op.GET_PERMS, _check_path(path) + b"\0", path)
        return [_decode(p) for p in raw.split(b"\0") if p]

    def set_perms(self, path: str, perms: list[str]) -> None:
        """Set permissions: first entry is owner + default access, e.g. ``["n0", "r5"]``."""
        if not perms or not all(_PERM_RE.fullmatch(p) for p in perms):
            raise ValueError(f"invalid xenstore permissions {perms!r}")
        data = _check_path(path) + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        self._call(Op.SET_PERMS, data, path)


class Transaction(XsHandle):
    """A transaction-bound handle; use as a context manager or commit()/abort()."""

    def __init__(self, router: _Router, tx_id: int, timeout: float) -> None:
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


class XenStore(XsHandle):
    """A connection to xenstored (its Unix socket, or the xenbus device).

    ``socket_path`` None means $XENSTORED_PATH, then $XENSTORED_RUNDIR/socket,
    then /var/run/xenstored/socket. ``xenbus=True`` uses /dev/xen/xenbus
    instead (``socket_path`` then names the device). ``timeout`` bounds every
    call. Thread-safe; create after any fork.
    """

    def __init__(
        self, socket_path: str | None = None, *, xenbus: bool = False, timeout: float = _DEFAULT_TIMEOUT
    ) -> None:
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
            self._router = _Router(connection, self._on_event)
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
        self._events.append((_decode(parts[0]), _decode(parts[1])))
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self._event_fd, 1)

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and its subtree. xenstored fires one event for
        ``path`` right away, then one per change (creation, write, removal,
        permission change) of it or any node below it."""
        data = _check_watch_path(path) + b"\0" + _check_token(token) + b"\0"
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
        data = _check_watch_path(path) + b"\0" + _check_token(token) + b"\0"
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
