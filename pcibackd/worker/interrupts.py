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

A disable always succeeds towards the guest (as in Linux), also when the
broker could not be reached; the unmap it owes is then retried before the
function's next op, so the broker's table and the guest's view meet again.

The broker is the supervisor's (:class:`pcibackd.irq.messages.Client` over the
worker's link); this process never maps a PIRQ itself.
"""

from __future__ import annotations

from typing import Callable

from loguru import logger

from pcibackd.hostpci.port import HostPort
from pcibackd.irq.function import Kind
from pcibackd.irq.messages import Client, IrqRefused, MapMsi, MapMsix, Unmap
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Op
from pcibackd.worker import msi
from pcibackd.worker.msi import MsiFunction, MsiOp, MsiState, PortFacts
from pcibackd.worker.ops import Reply

MSI_OPS = (Op.enable_msi, Op.disable_msi, Op.enable_msix, Op.disable_msix, Op.enable_multi_msi)
DISABLES = {Op.disable_msi: Kind.msi, Op.disable_msix: Kind.msix}

Lookup = Callable[[int, int, int], "tuple[BDF, HostPort] | None"]


class _Refusing:
    """A broker that refuses everything with one error (the state could not be asked for)."""

    def __init__(self, exc: IrqRefused) -> None:
        self.exc = exc

    def _refuse(self, *args) -> None:
        raise self.exc

    map_msi = map_msix = unmap_msi = unmap_msix = _refuse


class MsiService:
    """Serves the MSI ops of one worker; ``lookup`` finds a guest address's host function."""

    def __init__(self, broker: Client, lookup: Lookup) -> None:
        self.broker, self.lookup = broker, lookup
        self.facts: dict[BDF, PortFacts] = {}
        self.states: dict[BDF, MsiState] = {}
        self.reserving = False              # serving the op a dead predecessor left pending
        self.unmap_due: dict[BDF, Kind] = {}  # a disable the broker did not hear of

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
            facts = self.facts[host] = PortFacts(port)
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
            if untrusted.cmd in DISABLES:
                self.unmap_due[host] = DISABLES[untrusted.cmd]
        return outcome.reply

    def _settle(self, host: BDF) -> None:
        """Retry the unmap a disable owes the broker (it stays due while the broker is away)."""
        kind = self.unmap_due.get(host)
        if kind is None:
            return
        try:
            (self.broker.unmap_msi if kind is Kind.msi else self.broker.unmap_msix)(host)
        except IrqRefused as exc:
            logger.warning("{}: the unmap owed since a disable failed again: {}", host, exc)
            return
        del self.unmap_due[host]
        logger.info("{}: the unmap owed since a disable is done", host)

    def _recover(self, host: BDF) -> MsiState:
        state = msi.state_from_answer(self.broker.query(host))
        self.states[host] = state
        if state != MsiState():
            logger.info("{}: interrupt state taken over from the broker: {}", host, state)
        return state

    def forget(self, hosts) -> None:
        """``hosts`` are no longer served (their PIRQs are the supervisor's to tear down)."""
        for host in hosts:
            self.facts.pop(host, None)
            self.states.pop(host, None)
            self.unmap_due.pop(host, None)


def broker_send(ask: Callable, tell: Callable) -> Callable:
    """The :class:`Client`'s ``send`` over the link: ``ask`` waits, ``tell`` does not.

    A map the broker did not answer in time may still be done: the worker tells
    it to undo that (an unmap is idempotent and the link keeps order), so the
    guest, which is refused, never leaves PIRQs behind.
    """
    def send(request):
        answer = ask(request)
        if answer.error == "timeout" and isinstance(request, (MapMsi, MapMsix)):
            kind = Kind.msi if isinstance(request, MapMsi) else Kind.msix
            tell(Unmap(request.domid, request.bdf, kind))
        return answer
    return send
