"""The connection to xenstored and the thread that routes its replies.

Our own router rather than pyxs's: pyxs's has no per-call timeout, leaves
callers blocked forever when its thread dies (pyxs issue #11) and uses
select(), which fails for fds >= 1024.  Every failure reaches every waiting
caller: a lost connection wakes them all with ConnectionError.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import threading
from collections.abc import Callable

from pyxs.exceptions import ConnectionError as PyxsConnectionError

from pcibackd.xenstore.codec import Op, PacketReader, pack, reply_error


class _Reply:
    """One outstanding request: a pre-acquired lock the router releases."""

    __slots__ = ("lock", "packet")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.packet: tuple[int, int, bytes] | None = None  # (op, tx_id, payload)


_LOST = (-1, 0, b"")  # packet handed to waiters when the connection dies


class Router:
    """Owns the connection; a daemon thread routes replies and watch events.

    ``request`` sends one packet and blocks (up to ``timeout``) for its reply;
    ``on_event`` receives every WATCH_EVENT payload, on the router thread;
    ``on_lost`` is called there once the connection is gone.
    """

    def __init__(self, connection, on_event: Callable[[bytes], None],
                 on_lost: Callable[[], None] | None = None) -> None:
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
        self._on_lost = on_lost
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
        """The reply payload of one request; its ERROR reply raised as OSError."""
        reply = _Reply()
        rq_id = next(self._ids) & 0xFFFFFFFF
        packet = pack(op, rq_id, tx_id, payload)
        with self._lock:
            if self.error is not None:
                raise ConnectionError(errno.ENOTCONN, f"xenstore connection lost: {self.error}")
            self._pending[rq_id] = reply
            try:
                self._send(packet)
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
            raise reply_error(r_payload, path)
        if r_op == _LOST[0]:
            raise ConnectionError(errno.ENOTCONN, f"xenstore connection lost: {self.error}")
        if r_op != op or r_tx != tx_id:
            raise OSError(errno.EPROTO, f"unexpected xenstore reply op={r_op} tx={r_tx}", path)
        return r_payload

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        reader = PacketReader()
        try:
            while True:
                ready = poller.poll()
                if any(fd == self._wake_r for fd, _ in ready):
                    break
                chunk = self._recv(65536)
                if not chunk:
                    raise ConnectionError(errno.ECONNRESET, "xenstored closed the connection")
                for op, rq_id, tx_id, payload in reader.feed(chunk):
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
            if self._on_lost is not None:
                self._on_lost()

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
        """False once the connection is lost or closed."""
        return self.error is None and self._thread.is_alive()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # pipe full: the router is being woken anyway

    def close(self, timeout: float) -> None:
        """Stop the thread (waiting up to ``timeout``) and close the connection."""
        if self._thread.is_alive():
            self._wake()
            self._thread.join(timeout)
        self._connection.close(silent=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
