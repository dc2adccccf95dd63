"""The supervisor's side of MSI/MSI-X: one :class:`~pcibackd.irq.broker.Broker`, fed from xenstore.

Which guest holds which function is learnt from the trusted side only: the
guest's backend directory (``dev-N``, written by the toolstack; the guest can
only read it), never from a worker's report.  At every scan:

* a function that appears in a guest's backend is captured
  (:func:`~pcibackd.irq.function.record_for`, through the platform's config
  access), prepared (PHYSDEVOP_prepare_msix, MSI-X functions only) and
  ``assign``-ed;
* a function whose ``state-N`` turns Closed, or that leaves the backend, is
  ``unassign``-ed: its PIRQs are unmapped before the toolstack takes it away;
  one turning Closing (hot-unplug) stays the guest's until its worker lets it
  go, as xen-pciback tears down only after the frontend has: the guest's
  driver still runs its remove path then, on its interrupts (nvme deletes its
  queues and waits for the completions);
* a guest whose backend directory goes is ``domain_gone``;
* a function its worker lets go (``Leave``, before the worker resets it) is
  unassigned at once, and counts as leaving at the next scan;
* a function that left and is no other guest's after the scan is released
  (PHYSDEVOP_release_msix);
* a function two guests list stays with the one that holds it: a worker has a
  dom0 xenstore connection and can write any backend node (logged, rate-limited);
* after a restart, the first scan tears down every replayed mapping its
  guest's backend no longer lists.

A journal that cannot be written costs the request (EIO), never the supervisor.

A worker's request names a guest; the broker serves it only for the guest of
the worker that sent it (its authenticated identity, passed in as ``domid``),
at most :data:`RATE` requests a second per guest (a burst of :data:`BURST`):
each map costs hypercalls and journal writes, and a confined worker must not
make the supervisor spend its time on them.  The journal lives in
``<runtime>/irq`` and is replayed at start.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from loguru import logger

from pcibackd.common.ratelimit import worth_logging
from pcibackd.irq.broker import Broker
from pcibackd.irq.function import record_for
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import (Answer, Failed, IrqError, IrqStatus, Leave, Mapping, WorkerRequest, errno_name,
                                   op_error_name, refused)
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Op, XenbusState
from pcibackd.worker.xenbus_nodes import MAX_DEVS, parse_backend, parse_uint
from pcibackd.xenstore.client import XenStore

RATE, BURST = 2000.0, 512       # broker requests per second per guest; a guest driver needs a handful
CLOSING, CLOSED = int(XenbusState.Closing), int(XenbusState.Closed)


def assigned_functions(xs: XenStore, backend: str) -> tuple[set[BDF], set[BDF]]:
    """The functions a guest's backend lists: those in use, and those being unplugged (Closing).

    Read with the worker's own rules (:func:`~pcibackd.worker.xenbus_nodes.parse_backend`):
    the supervisor and the worker must agree on what the toolstack wrote.
    """
    untrusted_nodes: dict[str, str] = {}
    untrusted_num = xs.read(f"{backend}/num_devs")
    if untrusted_num is not None:
        untrusted_nodes["num_devs"] = untrusted_num
    for i in range(parse_uint(untrusted_num, MAX_DEVS) or 0):
        for key in (f"dev-{i}", f"state-{i}"):
            untrusted = xs.read(f"{backend}/{key}")
            if untrusted is not None:
                untrusted_nodes[key] = untrusted
    devs = parse_backend(untrusted_nodes).devs
    return ({dev.host for dev in devs if dev.state not in (CLOSING, CLOSED)},
            {dev.host for dev in devs if dev.state == CLOSING})


class Interrupts:
    """See module doc.  ``platform`` gives the Physdev and config access to functions."""

    def __init__(self, platform, runtime: Path, clock=time.monotonic) -> None:
        self.platform, self.clock = platform, clock
        self.broker = Broker(platform.physdev(), Journal(Path(runtime) / "irq"))
        self.assigned: dict[int, set[BDF]] = {}
        self.adopted: dict[int, set[BDF]] = {}   # replayed at start, not yet checked against xenstore
        self.unreadable: set[BDF] = set()     # warned about once; retried at every scan
        self.conflicts: dict[BDF, int] = {}   # scans in which two guests listed one function
        self.budget: dict[int, tuple[float, float]] = {}      # domid -> (tokens, at time)
        self.left: set[BDF] = set()           # let go by their worker since the last scan
        self.last_error: dict[BDF, IrqError] = {}     # for status; dropped when the function leaves
        self._statuses: dict[int, dict[BDF, IrqStatus]] | None = None   # statuses() until the next change

    def start(self, alive: set[int]) -> None:
        """Replay the journal: keep what live guests hold (until the first sync), unmap the rest."""
        self._statuses = None
        try:
            r = self.broker.replay(lambda domid: domid in alive)
        except OSError as exc:
            logger.error("irq journal: replay failed, mappings of live guests may be unknown: {}", exc)
            return
        for m in r.adopted:
            self.adopted.setdefault(m.domid, set()).add(m.bdf)
        if r.adopted or r.torn_down or r.uncertain or r.orphans or r.problems:
            logger.info("irq journal: {} mapping(s) adopted, {} torn down, {} uncertain, {} orphaned{}",
                        len(r.adopted), len(r.torn_down), len(r.uncertain), len(r.orphans),
                        "; " + "; ".join(r.problems) if r.problems else "")

    def sync(self, xs: XenStore, present: dict[int, str]) -> None:
        """Follow the backends (``{domid: backend path}``) now in xenstore.

        Everything that leaves is let go before anything new is taken, so a
        function moving from one guest to another in one scan ends up the new
        one's; a function that leaves for good is released (release_msix).  A
        function two guests list stays with the one holding it (a worker can
        write any backend node): the other is refused.
        """
        self._statuses = None
        try:
            self._sync(xs, present)
        except OSError as exc:             # a journal that cannot be written must not stop the daemon
            logger.error("irq: scan of the backends stopped: {}", exc)

    def _sync(self, xs: XenStore, present: dict[int, str]) -> None:
        listed = {domid: assigned_functions(xs, path) for domid, path in present.items()}
        # an unplugging function stays with a guest that has it (or had it before a restart:
        # adopted) until its worker lets go
        wanted = self._resolve_conflicts({
            domid: using | ((closing & (self.assigned.get(domid, set()) | self.adopted.get(domid, set())))
                            - self.left)
            for domid, (using, closing) in listed.items()})
        leaving: set[BDF] = set()
        for domid, adopted in self.adopted.items():
            for bdf in sorted(adopted - wanted.get(domid, set())):
                m = self.broker.live.get(bdf)
                if m is not None and m.domid == domid:
                    self._unassign(domid, bdf, leaving)
        self.adopted = {}
        for domid in [d for d in self.assigned if d not in present]:
            gone = self.assigned.pop(domid)
            leaving |= gone
            self.broker.domain_gone(domid)
            for bdf in gone:
                self.last_error.pop(bdf, None)
            self.budget.pop(domid, None)
        for domid, want in wanted.items():
            have = self.assigned.setdefault(domid, set())
            for bdf in sorted(have - want):
                have.discard(bdf)
                self._unassign(domid, bdf, leaving)
        for domid, want in wanted.items():
            have = self.assigned[domid]
            for bdf in sorted(want - have):
                if self._assign(domid, bdf):
                    have.add(bdf)
        leaving |= self.left
        self.left = set()
        held = set().union(*self.assigned.values())
        for bdf in sorted(leaving - held):
            answer = self.broker.release(bdf)
            if not answer.ok:
                logger.error("{}: PHYSDEVOP_release_msix failed ({}: {})", bdf, answer.error, answer.detail)

    def _resolve_conflicts(self, wanted: dict[int, set[BDF]]) -> dict[int, set[BDF]]:
        """One function, one guest: whoever holds it keeps it; a newcomer (or two) is refused."""
        claims: dict[BDF, list[int]] = {}
        for domid, want in sorted(wanted.items()):
            for bdf in want:
                claims.setdefault(bdf, []).append(domid)
        self.conflicts = {bdf: n for bdf, n in self.conflicts.items() if len(claims.get(bdf, ())) > 1}
        for bdf, domids in claims.items():
            if len(domids) < 2:
                continue
            holder = self._holder(bdf)
            for domid in domids:
                if domid != holder:
                    wanted[domid].discard(bdf)
            count = self.conflicts[bdf] = self.conflicts.get(bdf, 0) + 1
            if worth_logging(count):
                logger.error("{} is listed by domains {}: it stays {}, the others are refused ({} scan(s))",
                             bdf, domids, f"domain {holder}'s" if holder is not None else "unassigned", count)
        return wanted

    def _holder(self, bdf: BDF) -> int | None:
        for domid, have in self.assigned.items():
            if bdf in have:
                return domid
        m = self.broker.live.get(bdf)
        return m.domid if m is not None and bdf in self.adopted.get(m.domid, ()) else None

    def _unassign(self, domid: int, bdf: BDF, leaving: set[BDF]) -> None:
        leaving.add(bdf)
        self.last_error.pop(bdf, None)
        answer = self.broker.unassign(bdf)
        if not answer.ok:
            logger.error("{} left domain {} with interrupts still mapped: {}", bdf, domid, answer.detail)

    def _assign(self, domid: int, bdf: BDF) -> bool:
        try:
            port = self.platform.open_device(bdf)
            try:
                record = record_for(port.read, port.info)
            finally:
                close = getattr(port, "close", None)
                if close is not None:
                    close()
        except (OSError, ValueError) as exc:
            if bdf not in self.unreadable:
                self.unreadable.add(bdf)
                logger.warning("{} (domain {}): no interrupt record, MSI will be refused: {}", bdf, domid, exc)
            return False
        self.unreadable.discard(bdf)
        answer = self.broker.assign(domid, record)
        if not answer.ok:
            logger.error("{} not assigned to domain {} for interrupts: {}", bdf, domid, answer.detail)
            return False
        if record.has_msix:
            answer = self.broker.prepare(record)
            if not answer.ok:
                logger.warning("{}: PHYSDEVOP_prepare_msix failed ({}: {}); MSI-X will be refused",
                               bdf, answer.error, answer.detail)
        logger.debug("{} is domain {}'s for interrupts", bdf, domid)
        return True

    def mappings(self, domid: int) -> dict[BDF, Mapping]:
        """What the broker holds for guest ``domid``, by function."""
        return {bdf: m for bdf, m in self.broker.live.items() if m.domid == domid}

    def _keep_error(self, domid: int, request: WorkerRequest, answer: Answer) -> None:
        """The function's last interrupt error: the worker's note of what the guest got, or
        the broker's refusal (a note that follows says what the guest got of it)."""
        if request.domid != domid or self.broker.owner.get(request.bdf) != domid:
            return                                     # not the sender's function: nothing to keep
        if isinstance(request, Failed):
            error = IrqError(Op(request.op).name, op_error_name(request.op, request.err), request.cause)
        elif not answer.ok:
            error = IrqError("broker", f"-{errno_name(answer.errno)}", answer.error)
        else:
            return
        self.last_error[request.bdf] = error

    def status(self, domid: int) -> dict[BDF, IrqStatus]:
        """Per function of guest ``domid`` (held or mapped): PIRQs, MSI-X prepared, the last error."""
        return self.statuses().get(domid, {})

    def statuses(self) -> dict[int, dict[BDF, IrqStatus]]:
        """:meth:`status` of every guest that has any, in one pass over the broker's tables;
        the same objects until the tables change (they change only in start, sync and handle)."""
        if self._statuses is None:
            self._statuses = self._collect_statuses()
        return self._statuses

    def _collect_statuses(self) -> dict[int, dict[BDF, IrqStatus]]:
        b = self.broker
        bdfs: dict[int, set[BDF]] = {}
        for bdf, d in [*b.owner.items(), *((bdf, m.domid) for bdf, m in b.live.items())]:
            bdfs.setdefault(d, set()).add(bdf)
        return {d: {bdf: IrqStatus(b.live[bdf] if bdf in b.live and b.live[bdf].domid == d else None,
                                   bdf in b.prepared, self.last_error.get(bdf)) for bdf in these}
                for d, these in bdfs.items()}

    def handle(self, domid: int, request: WorkerRequest) -> Answer:
        """A request from the worker of ``domid`` (authenticated by the caller)."""
        self._statuses = None
        now = self.clock()
        tokens, then = self.budget.get(domid, (BURST, now))
        tokens = min(BURST, tokens + (now - then) * RATE)
        note = isinstance(request, Failed)
        # A note (for status) never takes the budget below half: a guest looping on a failing
        # enable must not starve its own maps and unmaps; beyond that notes are dropped.
        if tokens < (BURST / 2 if note else 1):
            self.budget[domid] = (tokens, now)
            return refused(errno.EAGAIN, "rate", f"more than {RATE:.0f} requests a second")
        self.budget[domid] = (tokens - 1, now)
        try:
            answer = self.broker.handle(domid, request)
        except OSError as exc:
            logger.error("irq: dom{}'s {} failed: {}", domid, type(request).__name__, exc)
            return refused(errno.EIO, "internal", str(exc)[:200])
        self._keep_error(domid, request, answer)
        if isinstance(request, Leave) and request.domid == domid and request.bdf in self.assigned.get(domid, ()):
            self.assigned[domid].discard(request.bdf)      # listed again later: assigned afresh
            self.left.add(request.bdf)
            self.last_error.pop(request.bdf, None)
        # rare (a few per driver load) and what an administrator asks first about a guest's
        # interrupts; the time matters: the worker waits IRQ_TIMEOUT, pcifront 2 s
        log = logger.debug if note else logger.info
        log("interrupts: domain {} asked {} -> {} in {:.0f} ms", domid, request, answer, (self.clock() - now) * 1000)
        return answer
