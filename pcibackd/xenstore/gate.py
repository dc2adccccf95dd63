"""The xenstore gate's forwarding: each worker connection paired with one xenstored connection.

Driver: sockets and one epoll set.  Every request a worker sends is judged by
:mod:`.policy` (its connection's :class:`~.policy.Session`); what is allowed
goes to xenstored unchanged, the rest is answered here with ``EACCES`` (as
xenstored answers a denied access) and logged, rate-limited.  Replies and
watch events go back unchanged.

One xenstored connection per worker connection, not one multiplexed
connection: xenstored itself keeps transactions and watches per connection,
so no request id, transaction id or watch token needs rewriting and none of
one worker can ever reach another's (an id that is not its connection's is
refused here too, and xenstored would not know it anyway); xenstored sees the
same number of connections as when each worker had its own.

Both directions are non-blocking with bounded buffers: a side that does not
read stops the gate reading its partner (backpressure), so a stalled or
flooding worker costs the gate at most :data:`HIGH_WATER` bytes and never
blocks another worker's traffic.  A malformed stream (a length over the
protocol's limit) closes that worker's pair only.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable

from loguru import logger

from pcibackd.common.ratelimit import worth_logging
from pcibackd.xenstore.codec import HEADER, Op, PacketReader
from pcibackd.xenstore.policy import REFUSAL, Scope, Session

__all__ = ["Gate", "HIGH_WATER"]

HIGH_WATER = 256 * 1024       # bytes buffered towards one side before its partner is no longer read
_CHUNK = 65536
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class _Link:
    """One worker's pair of connections and what is buffered towards each."""

    __slots__ = ("session", "down", "up", "from_down", "from_up", "to_down", "to_up", "masks", "closed")

    def __init__(self, session: Session, down: socket.socket, up: socket.socket) -> None:
        self.session, self.down, self.up = session, down, up
        self.from_down, self.from_up = PacketReader(), PacketReader()
        self.to_down, self.to_up = bytearray(), bytearray()
        self.masks = {down.fileno(): 0, up.fileno(): 0}
        self.closed = False


class Gate:
    """Pairs of connections in one epoll set (a wake-up costs O(ready), not O(workers));
    :meth:`poll_once` serves whatever is ready.

    ``connect_upstream()`` returns a new blocking connection to xenstored."""

    def __init__(self, connect_upstream: Callable[[], socket.socket]) -> None:
        self.connect_upstream = connect_upstream
        self.poller = select.epoll()
        self._links: dict[int, _Link] = {}           # either fd of a pair -> its link
        self._extra: dict[int, Callable[[], None]] = {}
        self.refused = 0
        self.forwarded = 0

    def watch(self, fd: int, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready()`` when ``fd`` polls readable (the gate's listener)."""
        self._extra[fd] = on_ready
        self.poller.register(fd, _IN)

    @property
    def links(self) -> int:
        return len(self._links) // 2

    def add(self, domid: int, down: socket.socket) -> None:
        """Serve ``down`` (a worker's connection) for ``domid``'s worker: connect it a
        xenstored connection of its own.  OSError when xenstored cannot be reached
        (``down`` is then left to the caller)."""
        up = self.connect_upstream()
        up.setblocking(False)
        down.setblocking(False)
        link = _Link(Session(Scope.of(domid)), down, up)
        for sock in (down, up):
            self._links[sock.fileno()] = link
            self.poller.register(sock.fileno(), 0)
        self._rearm(link)

    def poll_once(self, timeout_ms: int | None) -> None:
        for fd, events in self.poller.poll(-1 if timeout_ms is None else timeout_ms / 1000):
            on_ready = self._extra.get(fd)
            if on_ready is not None:
                on_ready()
                continue
            link = self._links.get(fd)
            if link is None or link.closed:
                continue
            try:
                self._serve(link, fd, events)
            except Exception as exc:        # noqa: BLE001 - one worker's pair, never the gate
                self._close(link, exc)

    def _serve(self, link: _Link, fd: int, events: int) -> None:
        from_worker = fd == link.down.fileno()
        if events & (_IN | _GONE):
            try:
                chunk = (link.down if from_worker else link.up).recv(_CHUNK)
            except BlockingIOError:       # a stale event (the fd was reused in this batch)
                chunk = None
            if chunk == b"":        # the worker left (or xenstored did): its partner goes too
                self._close(link, None)
                return
            if chunk:
                (self._from_worker if from_worker else self._from_xenstored)(link, chunk)
        self._flush(link.to_up, link.up)
        self._flush(link.to_down, link.down)
        self._rearm(link)

    def _from_worker(self, link: _Link, untrusted_chunk: bytes) -> None:
        session = link.session
        for op, rq_id, tx_id, untrusted_payload in link.from_down.feed(untrusted_chunk):
            verdict = session.request(op, tx_id, untrusted_payload)
            if verdict.allowed:
                self.forwarded += 1
                link.to_up += HEADER.pack(op, rq_id, tx_id, len(untrusted_payload)) + untrusted_payload
                continue
            self.refused += 1
            link.to_down += HEADER.pack(Op.ERROR, rq_id, tx_id, len(REFUSAL)) + REFUSAL
            if worth_logging(self.refused):
                logger.warning("xenstore gate: refused domain {}'s worker: {} ({} refusals so far)",
                               session.scope.domid, verdict.reason, self.refused)

    def _from_xenstored(self, link: _Link, chunk: bytes) -> None:
        for op, rq_id, tx_id, payload in link.from_up.feed(chunk):
            if op != Op.WATCH_EVENT:
                link.session.reply(op, payload)
            link.to_down += HEADER.pack(op, rq_id, tx_id, len(payload)) + payload

    @staticmethod
    def _flush(buf: bytearray, sock: socket.socket) -> None:
        if not buf:
            return
        try:
            sent = sock.send(buf)
        except BlockingIOError:
            return
        del buf[:sent]

    def _rearm(self, link: _Link) -> None:
        wanted = {
            link.down.fileno(): (_IN if len(link.to_up) < HIGH_WATER else 0) | (_OUT if link.to_down else 0),
            link.up.fileno(): (_IN if len(link.to_down) < HIGH_WATER else 0) | (_OUT if link.to_up else 0),
        }
        for fd, mask in wanted.items():
            if link.masks[fd] != mask:
                self.poller.modify(fd, mask)
                link.masks[fd] = mask

    def _close(self, link: _Link, why: BaseException | None) -> None:
        if link.closed:
            return
        link.closed = True
        for sock in (link.down, link.up):
            fd = sock.fileno()
            self._links.pop(fd, None)
            try:
                self.poller.unregister(fd)
            except (OSError, ValueError):
                pass
            sock.close()
        if why is not None:
            logger.info("xenstore gate: domain {}'s connection closed: {}", link.session.scope.domid, why)

    def close(self) -> None:
        """Close every pair (workers see their xenstore connection end)."""
        for link in {id(lk): lk for lk in self._links.values()}.values():
            self._close(link, None)
        self.poller.close()
