"""Ops 2-5 and 10 (MSI / MSI-X) answered as Linux xen-pciback answers them (pciback_ops.c).

Pure: the op's private snapshot, the function's facts (read through an
injected :class:`FactsReader`) and its :class:`MsiState` in; a
:class:`~pcibackd.worker.ops.Reply` and the new state out.  PIRQs come from
the injected :class:`IrqBroker` (the supervisor's broker; workers never map).

=====================  ===========================================================
case                   answer (err / value)
=====================  ===========================================================
no such function       dev_not_found / the guest's value (any of these ops)
enable_msi ok          0 / the PIRQ
enable_msi refused     op_failed / 0: MSI on (-EALREADY) or MSI-X on (-ENXIO), no
                       MSI capability, not in D0, broker refused (all folded)
disable_msi            0 / INTx PIRQ or 0 (always; unmaps only if MSI is on), or as
                       disable_msix while MSI-X is on (Linux 5.17+ guests' teardown)
enable_msix: nvec      > 128 (SH_INFO_MAX_VEC): -EINVAL / nvec
  MSI-X on             -EALREADY / nvec
  MSI on, MEM off      -ENXIO / nvec (MEM of the physical function for a VF)
  nvec 0, not D0,      -EINVAL / -EINVAL   (``value = result`` from here on)
  no MSI-X capability
  nvec > table size    -ENOSPC / -ENOSPC
  entry >= table size  -EINVAL / -EINVAL
  duplicate entry      -EINVAL / -EINVAL
  broker refused       -errno / -errno
  ok                   0 / 0, msix_entries[i].vector = PIRQ of entry i, i < nvec
disable_msix           0 / the MSI PIRQ if MSI is on, else INTx PIRQ or 0 (always)
enable_multi_msi (10)  not_implemented / the guest's value (Linux has no op 10)
=====================  ===========================================================

"Enabled" means enabled by an earlier op OR set in the device's control word
(the guest may have set it by a config write): pciback's "do not trust
dev->msi(x)_enabled".  Only the first MSI and MSI-X capabilities count.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from pcibackd.hostpci.port import HostPort
from pcibackd.irq.function import Kind, control_offset, record_for
from pcibackd.irq.messages import Answer, IrqRefused, cause_of
from pcibackd.wire import pciif
from pcibackd.wire.pciregs import COMMAND, COMMAND_MEM, MSI_ENABLE, MSIX_ENABLE, PM_CTRL, PMCSR_STATE
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import SH_INFO_MAX_VEC, Err, Op, OpHeader
from pcibackd.worker.ops import Reply

@dataclass(frozen=True)
class MsiOp:
    """The fields of one op's private snapshot that these ops use."""

    cmd: int
    domain: int
    bus: int
    devfn: int
    value: int                       # enable_msix: nvec
    info: int
    entries: tuple[int, ...] = ()    # msix_entries[i].entry for i < value (when value <= 128)

    @classmethod
    def from_snapshot(cls, op: bytes) -> "MsiOp":
        """Read an op snapshot (``xen_pci_op`` bytes, copied out of the page once)."""
        h = OpHeader.unpack(op)
        entries: tuple[int, ...] = ()
        if h.cmd == Op.enable_msix and h.value <= SH_INFO_MAX_VEC:
            entries = tuple(pciif.MSIX_ENTRY.unpack_from(op, pciif.OP_MSIX_ENTRIES + 4 * i)[1]
                            for i in range(h.value))
        return cls(h.cmd, h.domain, h.bus, h.devfn, h.value, h.info, entries)


@dataclass(frozen=True)
class MsiFacts:
    """What the device says right now (capability offsets are the first of each ID)."""

    msi_cap: int | None
    msix_cap: int | None
    msix_table_size: int             # 0 without MSI-X
    memory_decoding: bool            # COMMAND.MEMORY of the physical function
    in_d0: bool
    msi_hw_enabled: bool
    msix_hw_enabled: bool
    intx_pirq: int                   # what disable answers: the INTx PIRQ (dom0 GSI) or 0


class FactsReader(Protocol):
    def read_facts(self) -> MsiFacts: ...


class IrqBroker(Protocol):
    """Maps and unmaps PIRQs for this worker's guest; raises IrqRefused (with an errno).

    The PIRQs returned are checked already (one per entry, each fitting the
    reply): :class:`pcibackd.irq.messages.Client` refuses any other answer.
    """

    def map_msi(self, bdf: BDF, nvec: int) -> int: ...
    def map_msix(self, bdf: BDF, entries: tuple[int, ...]) -> tuple[int, ...]: ...
    def unmap_msi(self, bdf: BDF) -> None: ...
    def unmap_msix(self, bdf: BDF) -> None: ...


@dataclass(frozen=True)
class MsiState:
    """The guest-visible interrupt state of one function (pciback's msi(x)_enabled, ack_intr)."""

    msi_pirq: int = 0                                  # 0: MSI off
    msix: tuple[tuple[int, int], ...] = ()             # (entry, PIRQ); empty: MSI-X off
    intx_ack: bool = True                              # INTx acking on (off while MSI/MSI-X is on)

    @property
    def msi_enabled(self) -> bool:
        return self.msi_pirq != 0

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix)


@dataclass(frozen=True)
class MsiFunction:
    """One function as these ops see it: host address, facts, current state."""

    host: BDF
    facts: FactsReader
    state: MsiState = MsiState()


@dataclass(frozen=True)
class Outcome:
    reply: Reply
    state: MsiState | None = None                      # None: unchanged (or no function)
    problem: str = ""                                  # for the log: a broker error disable swallowed
    cause: str = ""                                    # the broker's refusal behind an error reply


def serve(op: MsiOp, fn: MsiFunction | None, broker: IrqBroker) -> Outcome:
    """Answer op 2, 3, 4, 5 or 10 for ``fn`` (None: not one of the guest's functions)."""
    if fn is None:
        return Outcome(Reply(Err.dev_not_found, op.value))
    return HANDLERS.get(op.cmd, _not_implemented)(op, fn, broker)


def _errno_reply(err: int) -> Reply:
    return Reply(-err, -err)         # Linux: op->value = result (a negative errno, u32 on the wire)


def enable_msi(op: MsiOp, fn: MsiFunction, broker: IrqBroker) -> Outcome:
    f, s = fn.facts.read_facts(), fn.state
    failed = Outcome(Reply(Err.op_failed, 0))
    if s.msi_enabled or f.msi_hw_enabled or s.msix_enabled or f.msix_hw_enabled:
        return failed                                      # -EALREADY / -ENXIO, folded
    if f.msi_cap is None or not f.in_d0:
        return failed                                      # -EINVAL from pci_enable_msi
    try:
        pirq = broker.map_msi(fn.host, 1)
    except IrqRefused as exc:
        return Outcome(failed.reply, problem=f"enable_msi: {exc}", cause=cause_of(exc))
    return Outcome(Reply(Err.success, pirq), replace(s, msi_pirq=pirq, intx_ack=False))


def disable_msi(op: MsiOp, fn: MsiFunction, broker: IrqBroker) -> Outcome:
    f, s = fn.facts.read_facts(), fn.state
    if s.msix_enabled:
        # Linux 5.17+ PV guests tear MSI-X down with this op (pcifront picks it by
        # dev->msix_enabled, which pci_disable_msix clears first); xen-pciback
        # ignores it and the guest's next enable_msix gets -EALREADY (INTx fallback).
        return disable_msix(op, fn, broker)
    if not s.msi_enabled:
        return Outcome(Reply(Err.success, f.intx_pirq))
    problem = _unmap(broker.unmap_msi, fn.host, "disable_msi")
    return Outcome(Reply(Err.success, f.intx_pirq), replace(s, msi_pirq=0, intx_ack=True), problem)


def enable_msix(op: MsiOp, fn: MsiFunction, broker: IrqBroker) -> Outcome:
    f, s, nvec = fn.facts.read_facts(), fn.state, op.value
    if nvec > SH_INFO_MAX_VEC:
        return Outcome(Reply(-errno.EINVAL, nvec))
    if s.msix_enabled or f.msix_hw_enabled:
        return Outcome(Reply(-errno.EALREADY, nvec))
    if s.msi_enabled or f.msi_hw_enabled or not f.memory_decoding:
        return Outcome(Reply(-errno.ENXIO, nvec))
    entries = op.entries[:nvec]
    if nvec < 1 or not f.in_d0 or f.msix_cap is None:
        return Outcome(_errno_reply(errno.EINVAL))
    if nvec > f.msix_table_size:
        return Outcome(_errno_reply(errno.ENOSPC))
    if any(e >= f.msix_table_size for e in entries) or len(set(entries)) != len(entries):
        return Outcome(_errno_reply(errno.EINVAL))
    try:
        pirqs = broker.map_msix(fn.host, entries)
    except IrqRefused as exc:
        return Outcome(_errno_reply(exc.errno or errno.EIO), problem=f"enable_msix: {exc}", cause=cause_of(exc))
    state = replace(s, msix=tuple(zip(entries, pirqs)), intx_ack=False)
    return Outcome(Reply(Err.success, 0, tuple(pirqs)), state)


def disable_msix(op: MsiOp, fn: MsiFunction, broker: IrqBroker) -> Outcome:
    f, s = fn.facts.read_facts(), fn.state
    # Linux answers with dev->irq: the MSI IRQ while MSI is on, else the INTx one.
    value = s.msi_pirq if s.msi_enabled else f.intx_pirq
    if not s.msix_enabled:
        return Outcome(Reply(Err.success, value))
    problem = _unmap(broker.unmap_msix, fn.host, "disable_msix")
    return Outcome(Reply(Err.success, value), replace(s, msix=(), intx_ack=True), problem)


def _not_implemented(op: MsiOp, fn: MsiFunction, broker: IrqBroker) -> Outcome:
    return Outcome(Reply(Err.not_implemented, op.value))


def _unmap(unmap: Callable[[BDF], None], host: BDF, what: str) -> str:
    """Disabling always succeeds towards the guest (as in Linux); a broker error is reported."""
    try:
        unmap(host)
    except IrqRefused as exc:
        return f"{what}: {exc}"
    return ""


Handler = Callable[[MsiOp, MsiFunction, IrqBroker], Outcome]

HANDLERS: dict[int, Handler] = {
    Op.enable_msi: enable_msi,
    Op.disable_msi: disable_msi,
    Op.enable_msix: enable_msix,
    Op.disable_msix: disable_msix,
    Op.enable_multi_msi: _not_implemented,
}


def readopt(op: MsiOp, fn: MsiFunction) -> Outcome | None:
    """The answer to an enable a dead predecessor had the broker map but never answered.

    Only for the op a predecessor left pending: an enable of what is mapped
    (MSI, or MSI-X with the same entries) is answered with the PIRQs the guest
    now holds, never mapped twice; None for anything else.
    """
    s = fn.state
    if op.cmd == Op.enable_msi and s.msi_enabled:
        return Outcome(Reply(Err.success, s.msi_pirq), s)
    if (op.cmd == Op.enable_msix and s.msix_enabled and op.value <= SH_INFO_MAX_VEC
            and op.entries == tuple(e for e, _ in s.msix)):
        return Outcome(Reply(Err.success, 0, tuple(p for _, p in s.msix)), s)
    return None


def state_from_answer(answer: Answer) -> MsiState:
    """A restarted worker's state from the broker's Query answer."""
    if answer.kind is None or not answer.pirqs:
        return MsiState()
    if answer.kind is Kind.msi:
        return MsiState(msi_pirq=answer.pirqs[0], intx_ack=False)
    return MsiState(msix=tuple(zip(answer.entries, answer.pirqs)), intx_ack=False)


class PortFacts:
    """:class:`FactsReader` over a HostPort (and, for a VF, its physical function's port).

    Capability offsets and the table size are read once (they are hardware's);
    enables, COMMAND and the power state at every call.
    """

    def __init__(self, port: HostPort, physfn: HostPort | None = None) -> None:
        self.port, self.physfn = port, physfn or port
        record = record_for(port.read, port.info)        # the broker's view of the same function
        self.msi_cap, self.msix_cap, self.pm_cap = record.msi_cap, record.msix_cap, record.pm_cap
        self.table_size = record.msix_entries

    def _ctrl(self, cap: int | None, bit: int) -> bool:
        return cap is not None and bool(self.port.read(control_offset(cap), 2) & bit)

    def read_facts(self) -> MsiFacts:
        read = self.port.read
        in_d0 = self.pm_cap is None or read(self.pm_cap + PM_CTRL, 2) & PMCSR_STATE == 0
        return MsiFacts(self.msi_cap, self.msix_cap, self.table_size,
                        bool(self.physfn.read(COMMAND, 2) & COMMAND_MEM), in_d0,
                        self._ctrl(self.msi_cap, MSI_ENABLE), self._ctrl(self.msix_cap, MSIX_ENABLE),
                        self.port.info.irq)
