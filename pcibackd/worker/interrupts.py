"""The worker's MSI/MSI-X service: ops 2-5 and 10 through :func:`msi.serve`, PIRQs from the broker.

Driver around the pure :mod:`pcibackd.worker.msi`: for each served function
it keeps the facts reader (:class:`~pcibackd.worker.msi.PortFacts` over the
function's HostPort) and its :class:`~pcibackd.worker.msi.MsiState`.  The
state of a function this worker has not served an MSI op for yet is unknown:
it is asked of the broker first (``Query``), so a restarted worker continues
where its predecessor stopped.  The op a predecessor left pending (served
while :attr:`MsiService.reserving`) may be an enable it had the broker map but
never answered: that one is answered with the mapped PIRQs
(:func:`~pcibackd.worker.msi.readopt`), never mapped twice.

The link can fail a question (no answer in time, a full queue) after the
broker acted on it, or before; the supervisor's rate limit can refuse one.  Either way the guest is answered at once (a
disable always succeeds, as in Linux; an enable is refused), and the unmap
that makes the broker agree with the guest's view is owed: sent at once
without waiting, and asked again before the function's next op until the
broker has answered it (an unmap of nothing is harmless).

A function that leaves the guest (hot-unplug, guest gone) is let go through
the broker before the worker resets it (:meth:`MsiService.leave`): MSI/MSI-X
off, PIRQs unmapped, no longer the guest's, then the reset, so Xen never has
PIRQs bound to a function that was reset behind its back.

The broker is the supervisor's (:class:`pcibackd.irq.messages.Client` over the
worker's link); this process never maps a PIRQ itself.
"""

from __future__ import annotations

import errno
import time
from typing import Callable

from loguru import logger

from pcibackd.hostpci.port import HostPort
from pcibackd.irq.function import Kind
from pcibackd.irq.messages import Client, Failed, IrqRefused, MapMsi, MapMsix, Unmap
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Op
from pcibackd.worker import msi
from pcibackd.worker.msi import MsiFunction, MsiOp, MsiState, PortFacts
from pcibackd.worker.ops import Reply

MSI_OPS = (Op.enable_msi, Op.disable_msi, Op.enable_msix, Op.disable_msix, Op.enable_multi_msi)
NOTE_RATE, NOTE_BURST = 10.0, 4         # Failed notes a second: they share the link (16 frames) with maps

Lookup = Callable[[int, int, int], "tuple[BDF, HostPort] | None"]


class _Refusing:
    """A broker that refuses everything with one error (the state could not be asked for)."""

    def __init__(self, exc: IrqRefused) -> None:
        self.exc = exc

    def _refuse(self, *args) -> None:
        raise self.exc

    map_msi = map_msix = unmap_msi = unmap_msix = _refuse


LINK_ERRORS = ("timeout", "link_busy")       # the link's own refusals (reporter.py), not the broker's
KINDS = {MapMsi: Kind.msi, MapMsix: Kind.msix}


class MsiService:
    """Serves the MSI ops of guest ``domid``'s worker over the link's ``ask`` (waits) and
    ``tell`` (does not); ``lookup`` finds a guest address's host function;
    ``open_device`` (the platform's) opens an SR-IOV VF's physical function,
    read only: a VF's memory decoding is its PF's."""

    def __init__(self, domid: int, ask: Callable, tell: Callable, lookup: Lookup,
                 open_device: Callable[[BDF], HostPort] | None = None) -> None:
        self.ask, self.tell, self.lookup, self.open_device = ask, tell, lookup, open_device
        self.broker = Client(domid, self._send)
        self.facts: dict[BDF, PortFacts] = {}
        self.states: dict[BDF, MsiState] = {}
        self.reserving = False              # serving the op a dead predecessor left pending
        self.unmap_due: set[tuple[BDF, Kind]] = set()   # unmaps the broker has not answered yet
        self.noted: dict[BDF, Failed] = {}                # the last error told, per function
        self.note_budget = (float(NOTE_BURST), time.monotonic())

    def _send(self, request):
        answer = self.ask(request)
        if isinstance(request, Unmap) and answer.error == "rate":
            self.unmap_due.add((request.bdf, request.kind))      # not done: asked again later
            return answer
        if answer.error not in LINK_ERRORS:
            if isinstance(request, Unmap):
                self.unmap_due.discard((request.bdf, request.kind))
            return answer
        if isinstance(request, (MapMsi, MapMsix)):
            self.unmap_due.add((request.bdf, KINDS[type(request)]))
            self.tell(Unmap(request.domid, request.bdf, KINDS[type(request)]))
        elif isinstance(request, Unmap):
            self.unmap_due.add((request.bdf, request.kind))
        return answer

    def install(self, handlers: dict) -> None:
        """Take ops 2-5 and 10 in a Dispatcher's ``external`` table."""
        for op in MSI_OPS:
            handlers[op] = self.serve

    def serve(self, op_bytes: bytes) -> Reply:
        untrusted = MsiOp.from_snapshot(op_bytes)
        found = self.lookup(untrusted.domain, untrusted.bus, untrusted.devfn)
        if found is None:
            return msi.serve(untrusted, None, self.broker).reply
        host, port = found
        facts = self.facts.get(host)
        if facts is None:
            facts = self.facts[host] = PortFacts(port, self._physfn(host, port))
        self._settle(host)
        broker = self.broker
        state = self.states.get(host)
        if state is None:
            try:
                state = self._recover(host)
            except IrqRefused as exc:
                logger.warning("{}: interrupt state unknown, broker query failed: {}", host, exc)
                state, broker = MsiState(), _Refusing(exc)
        fn = MsiFunction(host, facts, state)
        outcome = msi.readopt(untrusted, fn) if self.reserving else None
        if outcome is not None:
            logger.info("{}: pending op {} answered with the PIRQs mapped before this worker started",
                        host, untrusted.cmd)
        else:
            outcome = msi.serve(untrusted, fn, broker)
        if outcome.state is not None and broker is self.broker:
            self.states[host] = outcome.state
        if outcome.problem:
            logger.warning("{}: {}", host, outcome.problem)
        if outcome.reply.err < 0:         # for status: the function's last interrupt error
            self._note(Failed(self.broker.domid, host, untrusted.cmd, outcome.reply.err, outcome.cause))
        return outcome.reply

    def _note(self, note: Failed) -> None:
        """Tell the broker, unless it is the error told last, or notes come too fast.

        A guest looping on a failing enable must not fill the link its maps
        and unmaps need; status may then show an older error.
        """
        if self.noted.get(note.bdf) == note and not note.cause:
            return                        # (a broker refusal was kept as the broker's: say it again)
        tokens, then = self.note_budget
        now = time.monotonic()
        tokens = min(NOTE_BURST, tokens + (now - then) * NOTE_RATE)
        if tokens < 1:
            self.note_budget = (tokens, now)
            return
        self.note_budget = (tokens - 1, now)
        self.noted[note.bdf] = note
        self.tell(note)

    def _physfn(self, host: BDF, port: HostPort) -> HostPort | None:
        """A VF's physical function (None for others, or when it cannot be opened: MSI-X refused)."""
        physfn = port.info.physfn
        if physfn is None:
            return None
        try:
            if self.open_device is None:
                raise OSError(errno.ENODEV, "no platform to open it through")
            return self.open_device(physfn)
        except OSError as exc:
            logger.warning("{}: physical function {} not readable, MSI-X will be refused: {}", host, physfn, exc)
            return None

    def _settle(self, host: BDF) -> None:
        """Ask again for the unmaps still owed for ``host`` (they stay owed while the link fails)."""
        for kind in sorted(k for b, k in self.unmap_due if b == host):
            try:
                (self.broker.unmap_msi if kind is Kind.msi else self.broker.unmap_msix)(host)
            except IrqRefused as exc:
                logger.warning("{}: an owed {} unmap failed again: {}", host, kind.value, exc)
                continue
            logger.info("{}: an owed {} unmap is done", host, kind.value)

    def _recover(self, host: BDF) -> MsiState:
        state = msi.state_from_answer(self.broker.query(host))
        self.states[host] = state
        if state != MsiState():
            logger.info("{}: interrupt state taken over from the broker: {}", host, state)
        return state

    def leave(self, hosts) -> bool:
        """``hosts`` leave the guest: wait until the broker has their interrupts off and unmapped.

        Call before resetting them.  True when the broker confirmed every one
        (a function it no longer holds for this guest was let go by the
        supervisor's own scan, in the same order); False when it could not be
        asked or failed to unmap, which is logged: the supervisor's next scan
        tears down what is left.
        """
        done = True
        for host in hosts:
            try:
                self.broker.leave(host)
            except IrqRefused as exc:
                if exc.error != "not_assigned":
                    done = False
                    logger.error("{}: leaving with its interrupts not confirmed gone: {}", host, exc)
        self.forget(hosts)
        return done

    def forget(self, hosts) -> None:
        """``hosts`` are no longer served (their PIRQs are the supervisor's to tear down)."""
        for host in hosts:
            facts = self.facts.pop(host, None)
            if facts is not None and facts.physfn is not facts.port:
                getattr(facts.physfn, "close", lambda: None)()
            self.states.pop(host, None)
            self.noted.pop(host, None)
            self.unmap_due -= {(host, kind) for kind in Kind}

