"""A leaving function's order: MSI/MSI-X off, PIRQs unmapped, let go by the broker, then reset.

The simulated Xen records what it is asked, in order (``SimPhysdev.trail``);
the worker's reset (a stand-in for ``DeviceSet.remove``) is added to the same
record, with what the broker held at that moment.
"""

from __future__ import annotations

import errno
from types import SimpleNamespace

from pcibackd.daemon.interrupts import Interrupts
from pcibackd.hostpci.port import find_capability
from pcibackd.irq.broker import Broker
from pcibackd.irq.function import Kind, control_offset, record_for
from pcibackd.irq.journal import Journal
from pcibackd.irq.messages import Answer, Leave, MapMsi, MapMsix, Query
from helpers import op_bytes as snapshot
from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Op
from pcibackd.wire.pciregs import CAP_MSIX, COMMAND, COMMAND_INTX_DISABLE, MSIX_ENABLE
from pcibackd.worker.interrupts import MsiService
from pcibackd.worker.main import Worker
from simdom0.hostpci import SimHost
from simdom0.physdev import SimPhysdev, read_state
from simdom0.platform import SimPlatform, physdev_state_path

NIC, DISK = BDF(0, 3, 0, 0), BDF(0, 4, 0, 0)
DOM = 5
BE = "/local/domain/0/backend/pci/5/0"



class Rig:
    """One worker's MsiService talking straight to a broker on the simulated Xen."""

    def __init__(self, tmp) -> None:
        host = SimHost(tmp / "pci")
        self.devs = {NIC: host.add("e1000e", NIC), DISK: host.add("nvme", DISK)}
        self.xen = SimPhysdev(lambda bdf: self.devs[bdf])
        self.broker = Broker(self.xen, Journal(tmp / "irq"))
        for bdf, dev in self.devs.items():
            rec = record_for(dev.read, dev.info)
            self.broker.prepare(rec)
            self.xen.assign(DOM, bdf)
            self.broker.assign(DOM, rec)
        self.link_up = True
        guest = {0: NIC, 8: DISK}
        self.svc = MsiService(DOM, self.ask, self.ask,
                              lambda d, b, devfn: (guest[devfn], self.devs[guest[devfn]]) if devfn in guest else None)
        self.worker = SimpleNamespace(loop=SimpleNamespace(flush=lambda: None), msi=self.svc,
                                      devices=SimpleNamespace(remove=self.reset))
        self.at_reset: dict[BDF, dict] = {}

    def ask(self, req) -> Answer:
        if not self.link_up:
            return Answer(errno=errno.ETIMEDOUT, error="timeout")
        return self.broker.handle(DOM, req)

    def reset(self, hosts) -> None:
        """DeviceSet.remove's reset: note what Xen and the broker still had for the function."""
        for host in hosts:
            dev = self.devs[host]
            cap = find_capability(dev.read, CAP_MSIX)
            self.at_reset[host] = {
                "pirqs": [b.pirq for b in self.xen.bindings(DOM) if b.bdf == host],
                "msix_on": bool(dev.read(control_offset(cap), 2) & MSIX_ENABLE),
                "intx_disabled": bool(dev.read(COMMAND, 2) & COMMAND_INTX_DISABLE),
                "owned": host in self.broker.owner}
            self.xen.trail.append(("reset", host))
            dev.reset()

    def events(self, bdf: BDF) -> list[str]:
        return [e[0] for e in self.xen.trail if e[1] == bdf]


def test_hot_unplug_unmaps_and_lets_go_before_the_worker_resets(tmp_path):
    rig = Rig(tmp_path)
    assert rig.svc.serve(snapshot(Op.enable_msix, devfn=8, value=3, entries=(0, 1, 2))).err == 0
    assert rig.svc.serve(snapshot(Op.enable_msi, devfn=0)).err == 0
    rig.xen.trail.clear()
    Worker.remove(rig.worker, (DISK,))               # the worker's RemoveDevices action
    assert rig.at_reset[DISK] == {"pirqs": [], "msix_on": False, "intx_disabled": False, "owned": False}
    trail = rig.events(DISK)                          # MSI-X control, then COMMAND; 3 unmaps; the reset
    assert trail == ["write", "write", "unmap", "unmap", "unmap", "reset"]
    assert [b.bdf for b in rig.xen.bindings(DOM)] == [NIC]          # the other function keeps its MSI
    assert rig.broker.handle(DOM, MapMsix(DOM, DISK, (0,))).error == "not_assigned"


def test_a_function_the_supervisor_let_go_first_is_reset_at_once(tmp_path):
    rig = Rig(tmp_path)
    assert rig.svc.serve(snapshot(Op.enable_msix, devfn=8, value=1, entries=(0,))).err == 0
    assert rig.broker.unassign(DISK).ok               # the supervisor's scan saw state Closing first
    assert rig.svc.leave((DISK,))                    # not_assigned: already done, in the same order
    assert rig.events(DISK)[-1] == "unmap"


def test_without_an_answer_the_worker_still_resets_and_says_so(tmp_path):
    rig = Rig(tmp_path)
    assert rig.svc.serve(snapshot(Op.enable_msix, devfn=8, value=1, entries=(0,))).err == 0
    rig.link_up = False
    assert rig.svc.leave((DISK,)) is False
    assert DISK not in rig.svc.states


def test_the_supervisors_teardowns_disable_before_they_unmap(tmp_path):
    rig = Rig(tmp_path)
    assert rig.broker.handle(DOM, MapMsix(DOM, DISK, (0, 1))).ok
    assert rig.broker.handle(DOM, MapMsi(DOM, NIC)).ok
    rig.xen.trail.clear()
    rig.broker.unassign(DISK)                         # hot-unplug seen by the scan
    assert rig.events(DISK) == ["write", "write", "unmap", "unmap"]       # MSI-X control, COMMAND
    rig.xen.trail.clear()
    rig.broker.domain_gone(DOM)                       # the backend went before Xen freed the guest's PIRQs
    assert rig.events(NIC) == ["write", "write", "unmap"] and rig.xen.bindings() == []


class Store:
    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = nodes

    def read(self, path: str):
        return self.nodes.get(path)


def test_a_leave_is_a_function_leaving_at_the_next_scan(tmp_path):
    """Let go by its worker: released (release_msix) once no backend lists it, assigned afresh if one does."""
    irq = Interrupts(SimPlatform(tmp_path, 0), tmp_path / "run")
    SimHost(tmp_path / "pci").add("e1000e", NIC)
    prepared = lambda: read_state(physdev_state_path(tmp_path))["prepared"]   # noqa: E731
    xs = Store({f"{BE}/num_devs": "1", f"{BE}/dev-0": str(NIC), f"{BE}/state-0": "4"})
    irq.sync(xs, {DOM: BE})
    assert irq.handle(DOM, MapMsix(DOM, NIC, (0, 1))).ok
    assert irq.handle(DOM, Leave(DOM, NIC)).ok and read_state(physdev_state_path(tmp_path))["bindings"] == []
    assert irq.handle(DOM, Query(DOM, NIC)).error == "not_assigned"
    irq.sync(xs, {DOM: BE})                           # still listed (not Closing): assigned afresh
    assert irq.handle(DOM, MapMsi(DOM, NIC)).ok
    assert irq.handle(DOM, Leave(DOM, NIC)).ok
    xs.nodes[f"{BE}/state-0"] = "5"
    irq.sync(xs, {DOM: BE})                           # the unplug as the scan sees it
    assert prepared() == [] and irq.handle(DOM, Query(DOM, NIC)).error == "not_assigned"
    assert irq.handle(6, Leave(DOM, NIC)).error == "wrong_domain"
