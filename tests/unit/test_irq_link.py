"""MSI/MSI-X wiring around the pure cores: the broker messages on the worker link (strict on both
sides; the worker waiting for its answer), the worker's MsiService, and the supervisor's view of
assignments (xenstore's dev-N only)."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from loguru import logger

from pcibackd.daemon.interrupts import BURST, RATE, Interrupts, assigned_functions
from pcibackd.irq.function import Kind
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import Answer, Failed, IrqError, Leave, MapMsi, MapMsix, Query, Unmap
from pcibackd.platform.xen import NoPhysdev
from helpers import op_bytes as snapshot
from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op
from pcibackd.wire.pciregs import COMMAND, COMMAND_MEM, MSIX_ENABLE
from pcibackd.worker.interrupts import NOTE_BURST, MsiService
from pcibackd.worker.reporter import Reporter
from pcibackd.worker.link import (BadMessage, IrqReply, WorkerCommand, WorkerIrqRequest,
                                  parse_supervisor_message, parse_worker_message)
from simdom0.hostpci import SimHost
from simdom0.physdev import SimPhysdev, read_state
from simdom0.platform import SimPlatform, physdev_state_path

NIC = BDF(0, 3, 0, 0)


# -- the link ---------------------------------------------------------------------------

def test_irq_request_round_trip_and_strictness():
    msg = WorkerIrqRequest(3, 77, "tok", "irq-1", MapMsix(3, NIC, (0, 4)))
    assert parse_worker_message(msg.to_json()) == msg
    doc = json.loads(msg.to_json())
    for bad in ({"irq": "map_msix", "domid": 3, "bdf": "0000:03:00.0", "entries": list(range(129))},
                {"irq": "prepare", "domid": 3, "bdf": "0000:03:00.0"},            # supervisor-only
                {"irq": "map_msi", "domid": 3, "bdf": "0000:03:00.0", "nvec": 1, "extra": 1},
                {"irq": "unmap", "domid": 3, "bdf": "0000:03:00.0", "kind": "intx"},
                "map_msi", None):
        with pytest.raises(BadMessage):
            parse_worker_message(json.dumps(dict(doc, request=bad)).encode())


def test_supervisor_frames_are_commands_or_broker_answers():
    answer = Answer(pirqs=(55, 54), kind=Kind.msix, entries=(0, 1))
    assert parse_supervisor_message(IrqReply("irq-9", answer).to_json()) == IrqReply("irq-9", answer)
    assert parse_supervisor_message(WorkerCommand("ack").to_json()) == WorkerCommand("ack")
    good = json.loads(IrqReply("irq-9", answer).to_json())
    for bad in (dict(good, extra=1), dict(good, id=5), dict(good, answer={"errno": 0}),
                dict(good, answer=dict(good["answer"], pirqs=[0])),
                dict(good, answer=dict(good["answer"], errno=-1))):
        with pytest.raises(BadMessage):
            parse_supervisor_message(json.dumps(bad).encode())
    with pytest.raises(BadMessage):
        parse_supervisor_message(b"NaN")


# -- the worker's service over a simulated function ------------------------------------------

class Broker:
    """Answers by request type; records what was asked."""

    def __init__(self) -> None:
        self.asked: list = []
        self.told: list = []
        self.answers: dict = {MapMsix: Answer(pirqs=(55, 54)), MapMsi: Answer(pirqs=(53,))}

    def send(self, req):
        self.asked.append(req)
        return self.answers.get(type(req), Answer())



@pytest.fixture
def service(tmp_path):
    dev = SimHost(tmp_path / "pci").add("e1000e", NIC)
    broker = Broker()
    svc = MsiService(3, broker.send, broker.told.append,
                     lambda d, b, devfn: (NIC, dev) if (d, b, devfn) == (0, 0, 0) else None)
    return svc, broker


def test_service_asks_the_broker_for_the_state_once_then_serves(service):
    svc, broker = service
    reply = svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1)))
    assert (reply.err, reply.value, reply.vectors) == (0, 0, (55, 54))
    assert broker.asked == [Query(3, NIC), MapMsix(3, NIC, (0, 1))]
    assert svc.serve(snapshot(Op.enable_msix, value=1, entries=(2,))).err == -errno.EALREADY
    assert svc.serve(snapshot(Op.disable_msix)).err == Err.success
    assert broker.asked[-1] == Unmap(3, NIC, Kind.msix)
    assert svc.serve(snapshot(Op.enable_msi)).value == 53
    assert Query(3, NIC) not in broker.asked[1:]
    n = len(broker.asked)
    assert svc.serve(snapshot(Op.enable_msi, devfn=8)).err == Err.dev_not_found
    assert len(broker.asked) == n                                    # no function, no question
    svc.forget([NIC])
    svc.serve(snapshot(Op.disable_msi))
    assert broker.asked[n] == Query(3, NIC)                          # forgotten: asked again


def test_service_takes_over_a_dead_workers_state(service):
    svc, broker = service
    broker.answers[Query] = Answer(pirqs=(41, 42), kind=Kind.msix, entries=(0, 1))
    svc.reserving = True                      # the op its predecessor left pending
    reply = svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1)))
    assert (reply.err, reply.vectors) == (0, (41, 42))
    assert broker.asked == [Query(3, NIC)]                           # nothing mapped twice
    svc.reserving = False
    assert svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1))).err == -errno.EALREADY
    svc.serve(snapshot(Op.disable_msix))
    assert broker.asked[-1] == Unmap(3, NIC, Kind.msix)


def test_service_refuses_enables_while_the_state_is_unknown(service):
    svc, broker = service
    broker.answers[Query] = Answer(errno=errno.ETIMEDOUT, error="timeout")
    assert svc.serve(snapshot(Op.enable_msi)).err == Err.op_failed
    assert svc.serve(snapshot(Op.enable_msix, value=1, entries=(0,))).err == -errno.ETIMEDOUT
    assert [type(r) for r in broker.asked] == [Query, Query]        # never mapped blind; asked again


# -- the supervisor's side -------------------------------------------------------------------

class Store:
    """A read-only xenstore of plain values."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = nodes

    def read(self, path: str):
        return self.nodes.get(path)


BE = "/local/domain/0/backend/pci/5/0"


def test_assignments_come_from_dev_nodes_unplugging_apart():
    xs = Store({f"{BE}/num_devs": "5", f"{BE}/dev-0": "0000:03:00.0", f"{BE}/state-0": "3",
                f"{BE}/dev-1": "0000:04:00.0", f"{BE}/state-1": "5",          # being unplugged
                f"{BE}/dev-2": "garbage", f"{BE}/dev-3": "0000:05:00.1",
                f"{BE}/dev-4": "0000:06:00.0", f"{BE}/state-4": "6"})         # unplugged
    assert assigned_functions(xs, BE) == ({NIC, BDF(0, 5, 0, 1)}, {BDF(0, 4, 0, 0)})
    assert assigned_functions(Store({f"{BE}/num_devs": "99999999"}), BE) == (set(), set())
    assert assigned_functions(Store({f"{BE}/num_devs": "-1"}), BE) == (set(), set())
    # the worker's rules exactly: no non-ASCII digits, states compared as numbers
    one = {f"{BE}/dev-0": str(NIC), f"{BE}/dev-1": "0000:04:00.0"}
    assert assigned_functions(Store({f"{BE}/num_devs": "\u0662", **one}), BE) == (set(), set())
    assert assigned_functions(Store({f"{BE}/num_devs": "2", f"{BE}/state-1": "05", **one}), BE) == \
        ({NIC}, {BDF(0, 4, 0, 0)})


def test_supervisor_serves_only_the_assigned_guest_and_tears_down(tmp_path):
    platform = SimPlatform(tmp_path, 0)
    dev = SimHost(tmp_path / "pci").add("e1000e", NIC)
    irq = Interrupts(platform, tmp_path / "run")
    irq.start(set())
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{BE}/state-0": "4"})
    irq.sync(xs, {5: BE})
    assert irq.handle(6, MapMsix(6, NIC, (0,))).error == "not_assigned"
    assert irq.handle(6, MapMsix(5, NIC, (0,))).error == "wrong_domain"   # the sender is who it is
    answer = irq.handle(5, MapMsix(5, NIC, (0, 1)))
    assert answer.ok and len(answer.pirqs) == 2 and dev.read(0xA2, 2) & MSIX_ENABLE
    state = read_state(physdev_state_path(tmp_path))
    assert sorted(b["pirq"] for b in state["bindings"]) == sorted(answer.pirqs)
    assert state["prepared"] == [str(NIC)]
    # a fresh model of Xen reads the same state back (Xen outlives a supervisor); on a copy,
    # as a model rewrites its file when it loads it and the supervisor's must stay the writer
    copy = tmp_path / "xen-copy.json"
    copy.write_text(json.dumps(read_state(physdev_state_path(tmp_path))))
    assert SimPhysdev(platform.open_device, state_file=copy).pirq_count(5) == 2

    xs.nodes[f"{BE}/state-0"] = "5"                      # hot-unplug begins: the guest's driver still runs
    irq.sync(xs, {5: BE})
    assert len(read_state(physdev_state_path(tmp_path))["bindings"]) == 2 and dev.read(0xA2, 2) & MSIX_ENABLE
    assert irq.handle(5, Query(5, NIC)).ok
    assert irq.handle(5, Leave(5, NIC)).ok               # the guest let go: its worker releases
    assert read_state(physdev_state_path(tmp_path))["bindings"] == []
    assert not dev.read(0xA2, 2) & MSIX_ENABLE
    irq.sync(xs, {5: BE})                                # still Closing: not the guest's again
    assert irq.handle(5, Query(5, NIC)).error == "not_assigned"
    assert read_state(physdev_state_path(tmp_path))["prepared"] == []

    xs.nodes[f"{BE}/state-0"] = "6"                      # an unplug whose worker never let go
    irq.sync(xs, {5: BE})
    assert irq.handle(5, Query(5, NIC)).error == "not_assigned"

    xs.nodes[f"{BE}/state-0"] = "4"
    irq.sync(xs, {5: BE})
    assert irq.handle(5, MapMsi(5, NIC)).ok
    irq.sync(xs, {})                                     # the guest's backend is gone
    assert read_state(physdev_state_path(tmp_path))["bindings"] == []
    assert not (tmp_path / "run" / "irq" / "dom5.json").exists()


class NoHypercalls:
    """Real Xen as it is today: config access through the port, every hypercall ENOSYS."""

    def __init__(self, tmp: Path) -> None:
        self.host = SimHost(tmp / "pci")
        self.dev = self.host.add("e1000e", NIC)

    def open_device(self, bdf: BDF):
        return self.host.open(bdf)

    def physdev(self):
        return NoPhysdev()


def test_without_hypercalls_every_map_is_enosys_and_nothing_changes(tmp_path):
    platform = NoHypercalls(tmp_path)
    before = platform.dev.read(0xA2, 2), platform.dev.read(0x04, 2)
    irq = Interrupts(platform, tmp_path / "run")
    irq.start(set())
    irq.sync(Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC)}), {5: BE})
    assert irq.handle(5, MapMsix(5, NIC, (0,))).errno == errno.ENODATA       # prepare_msix was ENOSYS
    assert irq.handle(5, MapMsi(5, NIC)).errno == errno.ENOSYS
    assert irq.handle(5, Query(5, NIC)) == Answer()
    assert irq.handle(5, Unmap(5, NIC, Kind.msi)).ok
    assert (platform.dev.read(0xA2, 2), platform.dev.read(0x04, 2)) == before
    assert irq.mappings(5) == {}


def test_a_flooding_worker_is_refused_beyond_its_budget(tmp_path):
    now = [100.0]
    irq = Interrupts(NoHypercalls(tmp_path), tmp_path / "run", clock=lambda: now[0])
    answers = [irq.handle(5, Query(5, NIC)) for _ in range(BURST + 50)]   # all in one instant
    assert [a.error for a in answers] == ["not_assigned"] * BURST + ["rate"] * 50
    assert answers[-1].errno == errno.EAGAIN
    assert irq.handle(6, Query(6, NIC)).error == "not_assigned"          # another guest's budget is its own
    now[0] += 10.5 / RATE                                               # ten more (and a half)
    assert [irq.handle(5, Query(5, NIC)).error for _ in range(11)] == ["not_assigned"] * 10 + ["rate"]


def test_the_last_interrupt_error_is_kept_by_symbolic_names_until_the_function_leaves(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{BE}/state-0": "4"})
    irq.sync(xs, {5: BE})
    assert irq.handle(5, MapMsix(5, NIC, (0, 9))).error == "bad_entry"
    assert irq.status(5)[NIC].last_error == IrqError("broker", "-EINVAL", "bad_entry")
    assert irq.handle(5, Failed(5, NIC, Op.enable_msix, -errno.ENOSPC, "hypervisor/ENOSPC")).ok
    assert str(irq.status(5)[NIC].last_error) == "enable_msix -ENOSPC (hypervisor/ENOSPC)"
    assert irq.handle(5, Failed(5, NIC, Op.enable_msi, Err.op_failed)).ok
    assert str(irq.status(5)[NIC].last_error) == "enable_msi XEN_PCI_ERR_op_failed"
    assert irq.handle(6, Failed(6, NIC, Op.enable_msi, -errno.EIO)).error == "not_assigned"
    assert str(irq.status(5)[NIC].last_error) == "enable_msi XEN_PCI_ERR_op_failed"   # not another guest's
    assert irq.status(5)[NIC].msix_prepared and irq.status(5)[NIC].mapping is None
    xs.nodes[f"{BE}/state-0"] = "6"                      # unplugged
    irq.sync(xs, {5: BE})
    assert irq.status(5) == {} and NIC not in irq.last_error


def test_failed_notes_never_take_the_budget_below_half(tmp_path):
    now = [100.0]
    irq = Interrupts(NoHypercalls(tmp_path), tmp_path / "run", clock=lambda: now[0])
    notes = [irq.handle(5, Failed(5, NIC, Op.enable_msi, Err.op_failed)) for _ in range(BURST)]
    assert sum(a.error != "rate" for a in notes) == BURST // 2 + 1       # while half the budget is left
    answers = [irq.handle(5, Query(5, NIC)) for _ in range(BURST // 2 - 1)]
    assert "rate" not in [a.error for a in answers]                       # maps and unmaps still served


def test_a_disable_refused_by_the_rate_limit_is_owed(service):
    svc, broker = service
    assert svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1))).err == 0
    broker.answers[Unmap] = Answer(errno=errno.EAGAIN, error="rate")
    assert svc.serve(snapshot(Op.disable_msix)).err == Err.success
    del broker.answers[Unmap]
    n = len(broker.asked)
    svc.serve(snapshot(Op.disable_msi))
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msix)]                # asked again before the next op


def test_failed_notes_are_not_repeated_nor_flooded(service):
    svc, broker = service
    svc.serve(snapshot(Op.disable_msi))                                  # state known
    for _ in range(50):
        assert svc.serve(snapshot(Op.enable_msix, value=0)).err == -errno.EINVAL
    assert broker.told == [Failed(3, NIC, Op.enable_msix, -errno.EINVAL)]   # the same error: once
    for i in range(50):
        svc.serve(snapshot(Op.enable_msix, value=i % 2 * 6, entries=tuple(range(i % 2 * 6))))   # EINVAL, ENOSPC
    assert 1 < len(broker.told) <= NOTE_BURST + 1                         # at most a burst at once


def test_a_function_moving_between_guests_in_one_scan_is_the_new_ones(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    be6 = "/local/domain/0/backend/pci/6/0"
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{be6}/num_devs": "0"})
    irq.sync(xs, {6: be6, 5: BE})
    assert irq.handle(5, MapMsi(5, NIC)).ok
    xs.nodes.update({f"{BE}/num_devs": "0", f"{be6}/num_devs": "1", f"{be6}/dev-0": str(NIC)})
    irq.sync(xs, {6: be6, 5: BE})                          # dom6 is scanned first
    assert irq.handle(6, MapMsi(6, NIC)).ok and irq.mappings(5) == {}
    assert irq.handle(5, Query(5, NIC)).error == "not_assigned"


def _bindings(tmp_path: Path, domid: int) -> list[int]:
    state = read_state(physdev_state_path(tmp_path))
    return sorted(b["pirq"] for b in state["bindings"] if b["domid"] == domid)


def test_a_second_backend_listing_a_held_function_is_refused(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    be6 = "/local/domain/0/backend/pci/6/0"
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{be6}/num_devs": "0"})
    irq.sync(xs, {5: BE, 6: be6})
    pirqs = irq.handle(5, MapMsix(5, NIC, (0, 1))).pirqs
    xs.nodes.update({f"{be6}/num_devs": "1", f"{be6}/dev-0": str(NIC)})    # a worker wrote it
    logged: list[str] = []
    sink = logger.add(lambda msg: logged.append(msg), level="ERROR", format="{message}")
    try:
        for _ in range(5):
            irq.sync(xs, {6: be6, 5: BE})
            assert _bindings(tmp_path, 5) == sorted(pirqs) and irq.handle(5, Query(5, NIC)).pirqs == pirqs
            assert irq.handle(6, MapMsi(6, NIC)).error == "not_assigned"
    finally:
        logger.remove(sink)
    assert [m for m in logged if "listed by domains" in m and "domain 5's" in m][0] and len(logged) == 3  # 1, 2, 4
    xs.nodes[f"{BE}/num_devs"] = "0"                      # the owner lets go: now it may move
    irq.sync(xs, {6: be6, 5: BE})
    assert _bindings(tmp_path, 5) == [] and irq.handle(6, MapMsi(6, NIC)).ok


def test_two_newcomers_listing_one_function_both_are_refused(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    be6 = "/local/domain/0/backend/pci/6/0"
    irq.sync(Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC),
                    f"{be6}/num_devs": "1", f"{be6}/dev-0": str(NIC)}), {5: BE, 6: be6})
    assert irq.handle(5, Query(5, NIC)).error == irq.handle(6, Query(6, NIC)).error == "not_assigned"


def test_after_a_restart_the_first_scan_tears_down_what_no_backend_lists(tmp_path):
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    disk = BDF(0, 4, 0, 0)
    SimHost(tmp_path / "pci").add("nvme", disk)
    xs = Store({f"{BE}/num_devs": "2", f"{BE}/dev-0": str(NIC), f"{BE}/dev-1": str(disk)})
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    irq.start(set())
    irq.sync(xs, {5: BE})
    kept = irq.handle(5, MapMsix(5, NIC, (0,))).pirqs
    assert irq.handle(5, MapMsix(5, disk, (0, 1))).ok
    # the supervisor dies; meanwhile the disk is unplugged
    xs.nodes[f"{BE}/num_devs"] = "1"
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    irq.start({5})
    assert set(irq.mappings(5)) == {NIC, disk}             # adopted, not yet checked
    irq.sync(xs, {5: BE})
    assert set(irq.mappings(5)) == {NIC} and _bindings(tmp_path, 5) == sorted(kept)
    assert irq.handle(5, Query(5, NIC)).pirqs == kept
    assert str(disk) not in read_state(physdev_state_path(tmp_path))["prepared"]


def test_a_restart_during_a_hot_unplug_keeps_the_mapping_until_the_worker_lets_go(tmp_path):
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{BE}/state-0": "4"})
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    irq.start(set())
    irq.sync(xs, {5: BE})
    kept = irq.handle(5, MapMsix(5, NIC, (0, 1))).pirqs
    xs.nodes[f"{BE}/state-0"] = "5"                        # unplug begins; the supervisor dies
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    irq.start({5})
    irq.sync(xs, {5: BE})                                  # the guest's driver may still need them
    assert irq.handle(5, Query(5, NIC)).pirqs == kept and _bindings(tmp_path, 5) == sorted(kept)
    assert irq.handle(5, Leave(5, NIC)).ok
    irq.sync(xs, {5: BE})
    assert _bindings(tmp_path, 5) == [] and irq.handle(5, Query(5, NIC)).error == "not_assigned"


def test_a_function_leaving_for_good_is_released(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    prepared = lambda: read_state(physdev_state_path(tmp_path))["prepared"]   # noqa: E731
    be6 = "/local/domain/0/backend/pci/6/0"
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{be6}/num_devs": "0"})
    irq.sync(xs, {5: BE, 6: be6})
    assert irq.handle(5, MapMsix(5, NIC, (0,))).ok and prepared() == [str(NIC)]
    xs.nodes.update({f"{BE}/num_devs": "0", f"{be6}/num_devs": "1", f"{be6}/dev-0": str(NIC)})
    irq.sync(xs, {5: BE, 6: be6})                          # moves: stays prepared
    assert prepared() == [str(NIC)] and irq.handle(6, MapMsix(6, NIC, (0,))).ok
    xs.nodes[f"{be6}/state-0"] = "5"                       # hot-unplug: the guest still has it
    irq.sync(xs, {5: BE, 6: be6})
    assert prepared() == [str(NIC)]
    assert irq.handle(6, Leave(6, NIC)).ok                 # its worker lets go
    irq.sync(xs, {5: BE, 6: be6})
    assert prepared() == [] and irq.broker.prepared == set()
    xs.nodes[f"{be6}/state-0"] = "4"
    irq.sync(xs, {5: BE, 6: be6})
    assert prepared() == [str(NIC)]
    irq.sync(xs, {5: BE})                                  # the guest is destroyed
    assert prepared() == [] and irq.broker.prepared == set()


class ReadOnlyDisk(Journal):
    def save(self, domid, mappings) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    save_prepared = forget = lambda self, *args: ReadOnlyDisk.save(self, 0, ())     # noqa: E731


def test_a_journal_that_cannot_be_written_never_stops_the_supervisor(tmp_path):
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC)})
    irq.sync(xs, {5: BE})
    assert irq.handle(5, MapMsi(5, NIC)).ok
    irq.broker.journal = ReadOnlyDisk(tmp_path / "run" / "irq")
    assert irq.handle(5, Unmap(5, NIC, Kind.msi)).ok and _bindings(tmp_path, 5) == []
    assert irq.handle(5, MapMsix(5, NIC, (0,))).errno == errno.EIO and _bindings(tmp_path, 5) == []
    xs.nodes[f"{BE}/state-0"] = "5"
    irq.sync(xs, {5: BE})
    irq.sync(xs, {})
    assert irq.mappings(5) == {}


def test_msix_on_an_sriov_vf_decodes_through_its_physical_function(tmp_path):
    pf, vf = BDF(0, 1, 0, 0), BDF(0, 1, 0, 2)
    platform = SimPlatform(tmp_path, 0)
    host = SimHost(tmp_path / "pci")
    host.add("nvme-sriov", pf)
    vf_port = host.add("nvme-vf", vf, physfn=pf)
    vf_port.write(COMMAND, 2, vf_port.read(COMMAND, 2) | COMMAND_MEM)
    assert not vf_port.read(COMMAND, 2) & COMMAND_MEM          # as on hardware: the PF decodes for it
    assert platform.open_device(pf).read(COMMAND, 2) & COMMAND_MEM
    irq = Interrupts(platform, tmp_path / "run")
    irq.sync(Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(vf)}), {5: BE})
    svc = MsiService(5, lambda req: irq.handle(5, req), lambda req: None,
                     lambda d, b, devfn: (vf, vf_port) if (d, b, devfn) == (0, 0, 0) else None,
                     platform.open_device)
    reply = svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1)))
    assert reply.err == 0 and len(reply.vectors) == 2 and all(reply.vectors), reply
    assert _bindings(tmp_path, 5) == sorted(reply.vectors)
    assert svc.serve(snapshot(Op.disable_msix)).err == 0 and _bindings(tmp_path, 5) == []
    svc.forget([vf])


# -- the worker's side of the link, against a ROUTER standing in for the supervisor ------------

class FakeWorker:
    def __init__(self, endpoint: str) -> None:
        self.cfg = SimpleNamespace(domid=3, token="tok", supervisor_endpoint=endpoint)
        self.ran: list = []
        self.COMMANDS = {"note": lambda w, args: w.ran.append(args) or "noted"}


@pytest.fixture
def link(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path / 'w.sock'}"
    router.bind(endpoint)
    worker = FakeWorker(endpoint)
    reporter = Reporter(worker.cfg, worker)
    yield router, reporter, worker
    reporter.close()
    router.close(0)
    ctx.term()


def serve_one(router, answer_for):
    """Answer the next request in a thread: ``answer_for(msg)`` -> frames to send first, then the answer."""
    def run():
        ident, raw = router.recv_multipart()
        msg = parse_worker_message(raw)
        for frame in answer_for(msg):
            router.send_multipart([ident, frame])
    t = threading.Thread(target=run)
    t.start()
    return t


def test_ask_waits_for_its_own_answer_and_keeps_commands_for_later(link):
    router, reporter, worker = link
    late = IrqReply("irq-0", Answer(pirqs=(9,)))                       # an answer given up on earlier
    t = serve_one(router, lambda msg: [late.to_json(), WorkerCommand("note", {"n": 1}).to_json(),
                                       IrqReply(msg.id, Answer(pirqs=(55,), kind=Kind.msi, entries=(0,))).to_json()])
    answer = reporter.ask(Query(3, NIC))
    t.join()
    assert answer == Answer(pirqs=(55,), kind=Kind.msi, entries=(0,))
    assert worker.ran == [] and reporter.drain and len(reporter.deferred) == 1
    reporter.on_message()
    assert worker.ran == [{"n": 1}] and not reporter.drain


def test_ask_gives_up_after_its_timeout(link):
    router, reporter, worker = link
    answer = reporter.ask(MapMsi(3, NIC), timeout=0.05)
    assert (answer.errno, answer.error) == (errno.ETIMEDOUT, "timeout")
    ident, raw = router.recv_multipart()
    assert ident and parse_worker_message(raw).request == MapMsi(3, NIC)


def test_a_disable_the_broker_missed_is_retried_before_the_next_op(service):
    svc, broker = service
    assert svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1))).err == 0
    broker.answers[Unmap] = Answer(errno=errno.ETIMEDOUT, error="timeout")
    assert svc.serve(snapshot(Op.disable_msix)).err == Err.success      # the guest is never told
    assert svc.serve(snapshot(Op.disable_msix)).err == Err.success
    assert broker.asked[-1] == Unmap(3, NIC, Kind.msix)                  # retried, failed again
    del broker.answers[Unmap]
    n = len(broker.asked)
    assert svc.serve(snapshot(Op.enable_msix, value=2, entries=(4, 3))).err == 0
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msix), MapMsix(3, NIC, (4, 3))]
    svc.serve(snapshot(Op.enable_msi))
    assert MapMsix not in map(type, broker.asked[n + 2:]) and Unmap not in map(type, broker.asked[n + 2:])


def test_a_map_the_link_gave_up_on_is_undone_and_owed(service):
    svc, broker = service
    svc.serve(snapshot(Op.disable_msi))                                  # state known
    broker.answers[MapMsix] = Answer(errno=errno.ETIMEDOUT, error="timeout")
    assert svc.serve(snapshot(Op.enable_msix, value=2, entries=(0, 1))).err == -errno.ETIMEDOUT
    assert broker.told == [Unmap(3, NIC, Kind.msix),                    # at once, without waiting
                           Failed(3, NIC, Op.enable_msix, -errno.ETIMEDOUT, "timeout/ETIMEDOUT")]   # for status
    broker.answers[MapMsi] = Answer(errno=errno.EAGAIN, error="link_busy")
    n = len(broker.asked)
    assert svc.serve(snapshot(Op.enable_msi)).err == Err.op_failed
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msix), MapMsi(3, NIC)]   # the owed unmap first
    assert broker.told[-2:] == [Unmap(3, NIC, Kind.msi), Failed(3, NIC, Op.enable_msi, Err.op_failed, "link_busy/EAGAIN")]
    broker.answers[MapMsi] = Answer(pirqs=(53,))
    n = len(broker.asked)
    assert svc.serve(snapshot(Op.enable_msi)).value == 53
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msi), MapMsi(3, NIC)]
    broker.answers[Unmap] = Answer(errno=errno.ETIMEDOUT, error="timeout")
    assert svc.serve(snapshot(Op.disable_msi)).err == Err.success       # owed again ...
    n = len(broker.asked)
    svc.serve(snapshot(Op.disable_msix))
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msi)]               # ... and asked again, still owed
    del broker.answers[Unmap]
    n = len(broker.asked)
    svc.serve(snapshot(Op.disable_msix))
    svc.serve(snapshot(Op.disable_msix))
    assert broker.asked[n:] == [Unmap(3, NIC, Kind.msi)]               # paid once, then nothing owed
