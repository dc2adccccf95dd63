"""The op service loop: the only code that touches the shared page and channel.

Driver: reads and writes the guest's page and the event channel (both handed
in as a :class:`Ring`); what an op means is :mod:`~pcibackd.worker.ops`'s.

Hybrid wait: after each op the loop busy-polls ``_XEN_PCIF_active`` for a
short window (a frontend's next config access usually follows within
microseconds), then blocks on the event channel.  A fired port is unmasked
only after the pending ops are served (XSA-332: a flood costs O(1)).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from pcibackd.wire import pciif
from pcibackd.worker.ops import Dispatcher, Reply, write_reply

_FLAGS, _ACTIVE = pciif.SH_FLAGS, pciif._XEN_PCIF_active
# The byte of the (little-endian) flags word that holds the active bit, and the
# bit's mask in it: the loop tests the flag with a plain one-byte load.
_ACTIVE_BYTE, _ACTIVE_MASK = _FLAGS + _ACTIVE // 8, 1 << _ACTIVE % 8
# The copy-out and reply fields, as ops.snapshot_op and ops.write_reply have them.
_OP_START, _OP_END = pciif.SH_OP, pciif.SH_OP + pciif.PCI_OP.size
_ERR_AT, _VALUE_AT = pciif.SH_OP_ERR, pciif.SH_OP_VALUE
_PACK_ERR, _PACK_VALUE = pciif.I32.pack_into, pciif.U32.pack_into
# Ops served per call before the worker looks at xenstore, heartbeats and
# signals again: a guest issuing requests back to back cannot starve them.
# Each return costs about three ops (the loop's own pass: unmask, poll, drain);
# at 64 that pass was the op round trip's p99 (1 op in 64), at 256 it is not,
# and 256 ops are still only about a millisecond.
MAX_BATCH = 256


class Ring:
    """One mapped request page plus its bound event-channel port; ``owns_channel``
    False: the handle outlives the ring (a worker keeps one, opened before it gave up root)."""

    def __init__(self, page, evtchn, port: int, owns_channel: bool = True):
        self.page, self.evtchn, self.port, self.owns_channel = page, evtchn, port, owns_channel

    def close(self) -> None:
        try:
            self.evtchn.unbind(self.port)
        except OSError:
            pass
        if self.owns_channel:
            self.evtchn.close()
        self.page.close()


class OpLoop:
    """Serves ops from a :class:`Ring` through a :class:`Dispatcher`.

    ``dispatch`` stands in for ``dispatcher.dispatch`` (the fault-injection
    wrapper of :mod:`~pcibackd.worker.faults`); the counters stay the dispatcher's.
    """

    def __init__(self, dispatcher: Dispatcher, poll_window: float = 50e-6, max_batch: int = MAX_BATCH,
                 dispatch: Callable[[bytes], Reply] | None = None, watchdog=None):
        self.dispatcher = dispatcher
        self.dispatch = dispatch or dispatcher.dispatch
        self.poll_window = poll_window
        self.max_batch = max_batch
        self.backlog = False      # stopped at max_batch with a request still pending
        self.ring: Ring | None = None
        self.spurious = 0
        self.service_ns: deque[int] = deque(maxlen=1024)   # request seen -> reply posted
        self.watchdog = watchdog     # an OpWatchdog (stuck.py), armed while ops are served

    def fileno(self) -> int | None:
        return self.ring.evtchn.fileno() if self.ring else None

    def serve_pending(self) -> int:
        """Serve ops while the flag is set (at most ``max_batch``), then busy-poll the window."""
        ring = self.ring
        self.backlog = False
        if ring is None:
            return 0
        dog = self.watchdog
        if dog is None:
            return self._serve(ring)
        dog.arm()
        try:
            return self._serve(ring)
        finally:
            dog.disarm()

    def _serve(self, ring: Ring) -> int:
        # Everything the per-op path touches is bound to a local first: at a few
        # microseconds an op, attribute and global lookups are a visible share.
        buf, page = ring.page.buf, ring.page
        dispatch, window = self.dispatch, self.poll_window
        clock, record = time.perf_counter_ns, self.service_ns.append
        observe = self.dispatcher.stats.service.add      # the histogram the worker reports
        clear, notify, port = page.clear_bit, ring.evtchn.notify, ring.port
        pack_err, pack_value = _PACK_ERR, _PACK_VALUE
        served, limit = 0, self.max_batch
        flag, active = _ACTIVE_BYTE, _ACTIVE_MASK
        while True:
            while buf[flag] & active:   # plain load: x86 TSO orders it after the frontend's writes
                t0 = clock()
                reply = dispatch(bytes(buf[_OP_START:_OP_END]))     # one private copy (XSA-155)
                if reply.vectors:
                    write_reply(buf, reply)
                else:                   # write_reply inlined for the common case: err and value only
                    pack_err(buf, _ERR_AT, reply.err)
                    pack_value(buf, _VALUE_AT, reply.value & 0xFFFFFFFF)
                clear(_FLAGS, _ACTIVE)      # atomic, a full barrier after the writes
                notify(port)
                elapsed = clock() - t0
                record(elapsed)
                observe(elapsed)
                served += 1
                if served >= limit:
                    self.backlog = bool(buf[flag] & active)
                    return served
            if window <= 0:
                return served
            deadline = time.perf_counter() + window
            while not buf[flag] & active:
                if time.perf_counter() > deadline:
                    return served

    def on_event(self) -> int:
        """The channel fired: drain, serve, then unmask."""
        ring = self.ring
        if ring is None:
            return 0
        port = ring.evtchn.pending()
        served = self.serve_pending()
        if port is not None:
            ring.evtchn.unmask(port)
            if not served:
                self.spurious += 1
        return served

    def latency_us(self) -> dict | None:
        """p50/p99 service time over the last 1024 ops, in microseconds."""
        if not self.service_ns:
            return None
        s = sorted(self.service_ns)
        return {"p50": s[len(s) // 2] / 1000, "p99": s[min(len(s) - 1, len(s) * 99 // 100)] / 1000, "n": len(s)}

    def flush(self) -> int:
        """Answer an op in flight before the ring goes away (teardown/stop)."""
        return self.serve_pending() if self.ring else 0
