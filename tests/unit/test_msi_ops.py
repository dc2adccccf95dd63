"""Ops 2-5 and 10 answer as Linux xen-pciback does (pciback_ops.c), including every XSA-157 refusal.

Most tests drive the pure core with fixed facts and a recording broker; the
last ones run it over a simulated e1000e, the real broker core and simdom0's
model of Xen, through the worker's client.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from pcibackd.irq.broker import Broker
from pcibackd.irq.function import Kind, record_for
from pcibackd.wire.pciregs import COMMAND, COMMAND_MEM, MSIX_ENABLE, MSI_ENABLE
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import Answer, Client, IrqRefused
from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op
from pcibackd.worker.msi import (MsiFacts, MsiFunction, MsiOp, MsiState, PortFacts, readopt, serve,
                                 state_from_answer)
from pcibackd.worker.ops import Reply, write_reply
from simdom0.hostpci import SimHost
from simdom0.physdev import SimPhysdev

HOST = BDF(0, 3, 0, 0)
INTX = 11
FACTS = MsiFacts(msi_cap=0xD0, msix_cap=0xA0, msix_table_size=5, memory_decoding=True, in_d0=True,
                 msi_hw_enabled=False, msix_hw_enabled=False, intx_pirq=INTX)


@dataclass
class Fixed:
    facts: MsiFacts

    def read_facts(self) -> MsiFacts:
        return self.facts


@dataclass
class FakeBroker:
    """Hands out PIRQs from 55 downwards; records every call; can refuse."""

    refuse: int = 0
    calls: list = field(default_factory=list)
    live: int = 0
    next_pirq: int = 55

    def _check(self, call) -> None:
        self.calls.append(call)
        if self.refuse:
            raise IrqRefused(self.refuse, "hypervisor")

    def map_msi(self, bdf, nvec):
        self._check(("map_msi", bdf, nvec))
        self.live += 1
        self.next_pirq -= 1
        return self.next_pirq + 1

    def map_msix(self, bdf, entries):
        self._check(("map_msix", bdf, tuple(entries)))
        self.live += len(entries)
        pirqs = tuple(range(self.next_pirq, self.next_pirq - len(entries), -1))
        self.next_pirq -= len(entries)
        return pirqs

    def unmap_msi(self, bdf):
        self._check(("unmap_msi", bdf))
        self.live -= 1

    def unmap_msix(self, bdf):
        self._check(("unmap_msix", bdf))
        self.live = 0


def op(cmd: int, value: int = 0, entries=(), info: int = 0, where=(0, 0, 0x08)) -> MsiOp:
    return MsiOp(cmd, *where, value, info, tuple(entries))


def fn(state: MsiState = MsiState(), **facts) -> MsiFunction:
    return MsiFunction(HOST, Fixed(replace(FACTS, **facts)), state)


ON_MSI = MsiState(msi_pirq=40, intx_ack=False)
ON_MSIX = MsiState(msix=((0, 41), (1, 42)), intx_ack=False)


# -- the snapshot ------------------------------------------------------------------

def test_entries_come_from_the_snapshot_up_to_nvec():
    raw = [0] * (9 + 2 * pciif.SH_INFO_MAX_VEC)
    raw[0], raw[2], raw[3], raw[4], raw[7] = Op.enable_msix, 0, 1, 0x18, 3
    for i, entry in enumerate((4, 2, 0, 9)):
        raw[9 + 2 * i], raw[10 + 2 * i] = 0xFFFF, entry
    parsed = MsiOp.from_snapshot(pciif.PCI_OP.pack(*raw))
    assert (parsed.cmd, parsed.bus, parsed.devfn, parsed.value, parsed.entries) == (4, 1, 0x18, 3, (4, 2, 0))
    raw[7] = 129
    assert MsiOp.from_snapshot(pciif.PCI_OP.pack(*raw)).entries == ()


# -- no such function, op 10 -----------------------------------------------------------

@pytest.mark.parametrize("cmd", [Op.enable_msi, Op.disable_msi, Op.enable_msix, Op.disable_msix,
                                 Op.enable_multi_msi])
def test_an_unknown_function_is_dev_not_found_with_the_guests_value(cmd):
    broker = FakeBroker()
    out = serve(op(cmd, value=7), None, broker)
    assert (out.reply.err, out.reply.value, out.reply.vectors) == (Err.dev_not_found, 7, ())
    assert broker.calls == [] and out.state is None


def test_enable_multi_msi_is_not_implemented_like_linux():
    broker = FakeBroker()
    out = serve(op(Op.enable_multi_msi, value=3, info=4), fn(), broker)
    assert (out.reply.err, out.reply.value) == (Err.not_implemented, 3)
    assert broker.calls == [] and out.state is None


# -- MSI -------------------------------------------------------------------------------------

def test_enable_msi_answers_the_pirq_and_stops_intx_acking():
    broker = FakeBroker()
    out = serve(op(Op.enable_msi), fn(), broker)
    assert (out.reply.err, out.reply.value) == (Err.success, 55)
    assert out.state == MsiState(msi_pirq=55, intx_ack=False)
    assert broker.calls == [("map_msi", HOST, 1)]


MSI_REFUSALS = {
    "MSI already on": (ON_MSI, {}),
    "MSI on in the device": (MsiState(), {"msi_hw_enabled": True}),
    "MSI-X on": (ON_MSIX, {}),
    "MSI-X on in the device": (MsiState(), {"msix_hw_enabled": True}),
    "no MSI capability": (MsiState(), {"msi_cap": None}),
    "not in D0": (MsiState(), {"in_d0": False}),
}


@pytest.mark.parametrize("what", MSI_REFUSALS)
def test_enable_msi_refusals_fold_into_op_failed(what):
    state, facts = MSI_REFUSALS[what]
    broker = FakeBroker()
    out = serve(op(Op.enable_msi, value=9), fn(state, **facts), broker)
    assert (out.reply.err, out.reply.value) == (Err.op_failed, 0)
    assert broker.calls == [] and out.state is None


def test_enable_msi_broker_refusal_is_op_failed_too():
    out = serve(op(Op.enable_msi), fn(), FakeBroker(refuse=errno.ENOSPC))
    assert (out.reply.err, out.reply.value) == (Err.op_failed, 0) and "enable_msi" in out.problem


def test_disable_msi_when_not_enabled_touches_nothing():
    broker = FakeBroker()
    out = serve(op(Op.disable_msi, value=5), fn(), broker)
    assert (out.reply.err, out.reply.value) == (Err.success, INTX) and broker.calls == []
    assert serve(op(Op.disable_msi), fn(intx_pirq=0), broker).reply.value == 0     # no INTx (a VF)


def test_disable_msi_unmaps_and_always_succeeds():
    broker = FakeBroker()
    out = serve(op(Op.disable_msi), fn(ON_MSI), broker)
    assert (out.reply.err, out.reply.value) == (Err.success, INTX)
    assert out.state == MsiState() and broker.calls == [("unmap_msi", HOST)]
    out = serve(op(Op.disable_msi), fn(ON_MSI), FakeBroker(refuse=errno.EIO))
    assert out.reply.err == Err.success and out.state == MsiState() and "disable_msi" in out.problem


# -- MSI-X -----------------------------------------------------------------------------------

def test_enable_msix_answers_a_vector_per_entry():
    broker = FakeBroker()
    out = serve(op(Op.enable_msix, 3, (4, 0, 2)), fn(), broker)
    assert (out.reply.err, out.reply.value, out.reply.vectors) == (Err.success, 0, (55, 54, 53))
    assert out.state == MsiState(msix=((4, 55), (0, 54), (2, 53)), intx_ack=False)
    assert broker.calls == [("map_msix", HOST, (4, 0, 2))]


MSIX_REFUSALS = {
    # what: (nvec, entries, state, facts, err, value)
    "129 entries": (129, (), MsiState(), {}, -errno.EINVAL, 129),
    "129 entries beats MSI-X on": (129, (), ON_MSIX, {}, -errno.EINVAL, 129),
    "MSI-X already on": (1, (0,), ON_MSIX, {}, -errno.EALREADY, 1),
    "MSI-X on in the device": (1, (0,), MsiState(), {"msix_hw_enabled": True}, -errno.EALREADY, 1),
    "MSI on": (1, (0,), ON_MSI, {}, -errno.ENXIO, 1),
    "MSI on in the device": (1, (0,), MsiState(), {"msi_hw_enabled": True}, -errno.ENXIO, 1),
    "memory decoding off": (1, (0,), MsiState(), {"memory_decoding": False}, -errno.ENXIO, 1),
    "memory off beats 0 entries": (0, (), MsiState(), {"memory_decoding": False}, -errno.ENXIO, 0),
    "0 entries": (0, (), MsiState(), {}, -errno.EINVAL, -errno.EINVAL),
    "not in D0": (1, (0,), MsiState(), {"in_d0": False}, -errno.EINVAL, -errno.EINVAL),
    "no MSI-X capability": (1, (0,), MsiState(), {"msix_cap": None, "msix_table_size": 0},
                            -errno.EINVAL, -errno.EINVAL),
    "more entries than the table": (6, tuple(range(6)), MsiState(), {}, -errno.ENOSPC, -errno.ENOSPC),
    "entry beyond the table": (2, (0, 5), MsiState(), {}, -errno.EINVAL, -errno.EINVAL),
    "entry 0xffff": (1, (0xFFFF,), MsiState(), {}, -errno.EINVAL, -errno.EINVAL),
    "duplicate entries": (3, (1, 2, 1), MsiState(), {}, -errno.EINVAL, -errno.EINVAL),
}


@pytest.mark.parametrize("what", MSIX_REFUSALS)
def test_enable_msix_refusals_answer_linuxs_errno(what):
    nvec, entries, state, facts, err, value = MSIX_REFUSALS[what]
    broker = FakeBroker()
    out = serve(op(Op.enable_msix, nvec, entries), fn(state, **facts), broker)
    assert (out.reply.err, out.reply.value, out.reply.vectors) == (err, value, ())
    assert broker.calls == [] and out.state is None


@pytest.mark.parametrize("err", [errno.ENODATA, errno.ENOSPC, errno.ENODEV])
def test_enable_msix_passes_the_brokers_errno(err):
    out = serve(op(Op.enable_msix, 2, (0, 1)), fn(), FakeBroker(refuse=err))
    assert (out.reply.err, out.reply.value, out.reply.vectors) == (-err, -err, ())


def test_enable_msix_write_back_touches_only_err_value_and_used_vectors():
    out = serve(op(Op.enable_msix, 2, (3, 1)), fn(), FakeBroker())
    page = bytearray(b"\xAA" * pciif.PAGE_SIZE)
    write_reply(page, out.reply)
    changed = {i for i in range(pciif.PAGE_SIZE) if page[i] != 0xAA}
    want = set(range(pciif.SH_OP_ERR, pciif.SH_OP_ERR + 4)) | set(range(pciif.SH_OP_VALUE, pciif.SH_OP_VALUE + 4))
    want |= {pciif.msix_vector_offset(i) + b for i in range(2) for b in range(2)}
    assert changed <= want
    assert [pciif.U16.unpack_from(page, pciif.msix_vector_offset(i))[0] for i in range(2)] == [55, 54]


def test_disable_msix_when_not_enabled_answers_dev_irq():
    broker = FakeBroker()
    assert serve(op(Op.disable_msix), fn(), broker).reply.value == INTX
    # Linux answers dev->irq, which is the MSI IRQ while MSI is on.
    out = serve(op(Op.disable_msix), fn(ON_MSI), broker)
    assert (out.reply.err, out.reply.value, out.state) == (Err.success, 40, None)
    assert broker.calls == []


def test_disable_msix_unmaps_and_always_succeeds():
    broker = FakeBroker()
    out = serve(op(Op.disable_msix), fn(ON_MSIX), broker)
    assert (out.reply.err, out.reply.value, out.state) == (Err.success, INTX, MsiState())
    assert broker.calls == [("unmap_msix", HOST)]
    out = serve(op(Op.disable_msix), fn(ON_MSIX), FakeBroker(refuse=errno.EIO))
    assert out.reply.err == Err.success and out.state == MsiState() and out.problem


def test_disable_msi_while_msix_is_on_tears_msix_down_for_a_5_17_guest():
    """A Linux 5.17+ PV guest sends disable_msi for its MSI-X teardown (it has cleared
    msix_enabled by then): MSI-X goes off, so its next enable_msix is not -EALREADY."""
    broker = FakeBroker()
    out = serve(op(Op.disable_msi), fn(ON_MSIX), broker)
    assert (out.reply.err, out.reply.value, out.state) == (Err.success, INTX, MsiState())
    assert broker.calls == [("unmap_msix", HOST)]
    again = serve(op(Op.enable_msix, value=2, entries=(0, 1)), fn(out.state), broker)
    assert again.reply.err == Err.success and again.state.msix_enabled


def test_a_restarted_worker_rebuilds_its_state_from_the_broker():
    assert state_from_answer(Answer()) == MsiState()
    assert state_from_answer(Answer(pirqs=(40,), kind=Kind.msi, entries=(0,))) == ON_MSI
    assert state_from_answer(Answer(pirqs=(41, 42), kind=Kind.msix, entries=(0, 1))) == ON_MSIX


def test_the_op_a_dead_worker_left_pending_is_answered_with_what_is_mapped():
    out = readopt(op(Op.enable_msix, 2, (0, 1)), fn(ON_MSIX))
    assert out.reply == Reply(0, 0, (41, 42)) and out.state == ON_MSIX
    assert readopt(op(Op.enable_msi), fn(ON_MSI)).reply == Reply(0, 40)
    assert readopt(op(Op.enable_msix, 2, (1, 0)), fn(ON_MSIX)) is None       # other entries: served anew
    assert readopt(op(Op.enable_msix, 1, (0,)), fn(ON_MSIX)) is None
    assert readopt(op(Op.enable_msi), fn(ON_MSIX)) is None
    assert readopt(op(Op.disable_msix), fn(ON_MSIX)) is None
    assert readopt(op(Op.enable_msix, 2, (0, 1)), fn()) is None


# -- over a simulated function, the broker core and the model of Xen -----------------------------

@pytest.fixture
def rig(tmp_path):
    # The journal lives on tmpfs as in production (/run): a rename there costs microseconds.
    shm = Path("/dev/shm")
    jdir = Path(tempfile.mkdtemp(prefix="pcibackd-irqtest-", dir=shm if shm.is_dir() else tmp_path))
    dev = SimHost(tmp_path / "sim").add("e1000e", HOST)
    xen = SimPhysdev(lambda bdf: dev)
    broker = Broker(xen, Journal(jdir))
    record = record_for(dev.read, dev.info)
    assert broker.prepare(record).ok
    xen.assign(5, HOST)
    broker.assign(5, record)
    client = Client(5, lambda req: broker.handle(5, req))
    yield dev, xen, client, jdir
    shutil.rmtree(jdir, ignore_errors=True)


def test_port_facts_read_the_device(rig):
    dev = rig[0]
    facts = PortFacts(dev).read_facts()
    assert facts == MsiFacts(0xD0, 0xA0, 5, True, True, False, False, dev.info.irq)
    dev.write(0xD2, 2, dev.read(0xD2, 2) | MSI_ENABLE)
    assert PortFacts(dev).read_facts().msi_hw_enabled
    physfn = SimHost(dev.root).add("e1000e", BDF(0, 9, 0, 0))
    physfn.write(COMMAND, 2, physfn.read(COMMAND, 2) & ~COMMAND_MEM)
    assert not PortFacts(dev, physfn).read_facts().memory_decoding


def test_a_guest_toggling_a_thousand_times_leaks_no_pirq(rig):
    dev, xen, client, journal = rig
    function = MsiFunction(HOST, PortFacts(dev))
    start = xen.pirq_count()

    def run(cmd, value=0, entries=()):
        out = serve(op(cmd, value, entries), function, client)
        assert not out.problem, out.problem
        return out

    for _ in range(1000):
        out = run(Op.enable_msi)
        assert out.reply.err == Err.success and out.reply.value > 0
        function = replace(function, state=out.state)
        assert run(Op.enable_msix, 1, (0,)).reply.err == -errno.ENXIO      # one type at a time
        function = replace(function, state=run(Op.disable_msi).state)
        out = run(Op.enable_msix, 5, (0, 1, 2, 3, 4))
        assert out.reply.err == Err.success and xen.pirq_count() == start + 5
        function = replace(function, state=out.state)
        assert dev.read(0xA2, 2) & MSIX_ENABLE
        function = replace(function, state=run(Op.disable_msix).state)
    assert xen.pirq_count() == start and function.state == MsiState()
    assert xen.double_maps == [] and xen.dropped == []
    assert not (dev.read(0xA2, 2) & MSIX_ENABLE or dev.read(0xD2, 2) & MSI_ENABLE)
    assert not (journal / "dom5.json").exists()
