"""The supervisor's side of MSI/MSI-X: one :class:`~pcibackd.irq.broker.Broker`, fed from xenstore.

Which guest holds which function is learnt from the trusted side only: the
guest's backend directory (``dev-N``, written by the toolstack; the guest can
only read it), never from a worker's report.  At every scan:

* a function that appears in a guest's backend is captured
  (:func:`~pcibackd.irq.function.record_for`, through the platform's config
  access), prepared (PHYSDEVOP_prepare_msix, MSI-X functions only) and
  ``assign``-ed;
* a function whose ``state-N`` turns Closing/Closed (hot-unplug), or that
  leaves the backend, is ``unassign``-ed: its PIRQs are unmapped before the
  toolstack takes it away;
* a guest whose backend directory goes is ``domain_gone``.

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

from pcibackd.irq.broker import Broker
from pcibackd.irq.function import record_for
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import Answer, Mapping, WorkerRequest, refused
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import XenbusState
from pcibackd.xenstore.client import XenStore

MAX_DEVS = 256                  # num_devs beyond this is not a toolstack's
RATE, BURST = 2000.0, 512       # broker requests per second per guest; a guest driver needs a handful
LEAVING = (str(int(XenbusState.Closing)), str(int(XenbusState.Closed)))


def assigned_functions(xs: XenStore, backend: str) -> set[BDF]:
    """The functions a guest's backend lists and that are not on their way out."""
    untrusted_num = xs.read(f"{backend}/num_devs") or "0"
    if not untrusted_num.isdigit() or len(untrusted_num) > 3:
        return set()
    out = set()
    for i in range(min(int(untrusted_num), MAX_DEVS)):
        dev = xs.read(f"{backend}/dev-{i}")
        if dev is None or len(dev) > 16 or xs.read(f"{backend}/state-{i}") in LEAVING:
            continue
        try:
            out.add(BDF.parse(dev))
        except ValueError:
            continue
    return out


class Interrupts:
    """See module doc.  ``platform`` gives the Physdev and config access to functions."""

    def __init__(self, platform, runtime: Path, clock=time.monotonic) -> None:
        self.platform, self.clock = platform, clock
        self.broker = Broker(platform.physdev(), Journal(Path(runtime) / "irq"))
        self.assigned: dict[int, set[BDF]] = {}
        self.unreadable: set[BDF] = set()     # warned about once; retried at every scan
        self.budget: dict[int, tuple[float, float]] = {}      # domid -> (tokens, at time)

    def start(self, alive: set[int]) -> None:
        """Replay the journal: keep what live guests hold, unmap the rest."""
        r = self.broker.replay(lambda domid: domid in alive)
        if r.adopted or r.torn_down or r.uncertain or r.orphans or r.problems:
            logger.info("irq journal: {} mapping(s) adopted, {} torn down, {} uncertain, {} orphaned{}",
                        len(r.adopted), len(r.torn_down), len(r.uncertain), len(r.orphans),
                        "; " + "; ".join(r.problems) if r.problems else "")

    def sync(self, xs: XenStore, present: dict[int, str]) -> None:
        """Follow the backends (``{domid: backend path}``) now in xenstore.

        Everything that leaves is let go before anything new is taken, so a
        function moving from one guest to another in one scan ends up the new one's.
        """
        wanted = {domid: assigned_functions(xs, path) for domid, path in present.items()}
        for domid in [d for d in self.assigned if d not in present]:
            self.broker.domain_gone(domid)
            del self.assigned[domid]
            self.budget.pop(domid, None)
        for domid, want in wanted.items():
            have = self.assigned.setdefault(domid, set())
            for bdf in sorted(have - want):
                answer = self.broker.unassign(bdf)
                have.discard(bdf)
                if not answer.ok:
                    logger.error("{} left domain {} with interrupts still mapped: {}", bdf, domid,
                                 answer.detail)
        for domid, want in wanted.items():
            have = self.assigned[domid]
            for bdf in sorted(want - have):
                if self._assign(domid, bdf):
                    have.add(bdf)

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
        if record.has_msix:
            answer = self.broker.prepare(record)
            if not answer.ok:
                logger.warning("{}: PHYSDEVOP_prepare_msix failed ({}: {}); MSI-X will be refused",
                               bdf, answer.error, answer.detail)
        self.broker.assign(domid, record)
        logger.debug("{} is domain {}'s for interrupts", bdf, domid)
        return True

    def mappings(self, domid: int) -> dict[BDF, Mapping]:
        """What the broker holds for guest ``domid``, by function."""
        return {bdf: m for bdf, m in self.broker.live.items() if m.domid == domid}

    def handle(self, domid: int, request: WorkerRequest) -> Answer:
        """A request from the worker of ``domid`` (authenticated by the caller)."""
        now = self.clock()
        tokens, then = self.budget.get(domid, (BURST, now))
        tokens = min(BURST, tokens + (now - then) * RATE)
        if tokens < 1:
            self.budget[domid] = (tokens, now)
            return refused(errno.EAGAIN, "rate", f"more than {RATE:.0f} requests a second")
        self.budget[domid] = (tokens - 1, now)
        answer = self.broker.handle(domid, request)
        # rare (a few per driver load) and what an administrator asks first about a guest's
        # interrupts; the time matters: the worker waits 1 s, pcifront 2 s
        logger.info("interrupts: domain {} asked {} -> {} in {:.0f} ms", domid, request, answer,
                    (self.clock() - now) * 1000)
        return answer
