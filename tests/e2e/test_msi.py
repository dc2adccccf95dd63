"""MSI and MSI-X through the running daemon on the simulated dom0.

A simulated guest (pcifront, Linux's calls) enables interrupts; the worker
serves the op and asks the supervisor's broker, which maps PIRQs in the
simulated Xen (``sim/xen/physdev.json``) and sets the enable bits in the
simulated function's config space.  Functions: nvme (MSI-X, 65 entries,
no MSI), e1000e (MSI at 0xd0 and MSI-X at 0xa0 with 5 entries).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading

import pytest
import zmq

from helpers import detach_in_background
from pcibackd.control.commands.status import render as render_status
from pcibackd.hostpci.port import find_capability
from pcibackd.irq.function import control_offset
from pcibackd.irq.messages import MapMsix
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op
from pcibackd.wire.pciregs import CAP_MSI, CAP_MSIX, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEM, MSIX_ENABLE, MSI_ENABLE
from pcibackd.worker.link import WorkerIrqRequest
from pcibackd.xenstore.client import XenStore
from pcibackd.xenstore.toolstack import Toolstack
from simdom0.physdev import read_state
from simdom0.platform import physdev_state_path
from waiting import wait_until

NVME, NIC = "0000:00:05.0", "0000:00:06.0"
G_NVME, G_NIC = BDF(0, 0, 0, 0), BDF(0, 0, 1, 0)      # where the guest sees them (vpci, in order)


class Guest:
    """A connected guest with an nvme and an e1000e, and what Xen and the hardware say."""

    def __init__(self, dom0, domid: int = 1) -> None:
        self.dom0, self.domid = dom0, domid
        self.hw = {G_NVME: dom0.add_device("nvme", NVME), G_NIC: dom0.add_device("e1000e", NIC)}
        dom0.create_guest(domid, [NVME, NIC])
        self.front = dom0.frontend(domid)
        assert [d.bdf for d in self.front.connect()] == [G_NVME, G_NIC]

    def xen(self) -> dict:
        path = physdev_state_path(self.dom0.sim_dir)
        return read_state(path) if path.exists() else {"bindings": [], "double_maps": []}

    def pirqs(self, kind: str | None = None) -> list[int]:
        return sorted(b["pirq"] for b in self.xen()["bindings"]
                      if b["domid"] == self.domid and kind in (None, b["kind"]))

    def enabled(self, guest_bdf: BDF, cap_id: int, bit: int) -> bool:
        dev = self.hw[guest_bdf]
        return bool(dev.read(control_offset(find_capability(dev.read, cap_id)), 2) & bit)

    def intx_disabled(self, guest_bdf: BDF) -> bool:
        return bool(self.hw[guest_bdf].read(COMMAND, 2) & COMMAND_INTX_DISABLE)

    def worker_pid(self) -> int:
        g = wait_until(lambda: (s := self.dom0.guest_status(self.domid)) and s["worker_state"] == "RUNNING"
                       and s["pid"] and s, what="a running worker")
        return g["pid"]


@pytest.fixture
def guest(dom0) -> Guest:
    return Guest(dom0)


def test_msix_enable_maps_distinct_pirqs_and_sets_the_enable_bit(guest):
    r = guest.front.enable_msix(G_NVME, [0, 1, 2, 7])
    assert r.ok, r
    assert len(set(r.pirqs)) == 4 and all(p > 0 for p in r.pirqs)
    assert guest.pirqs("msix") == sorted(r.pirqs)
    entries = {b["entry"]: b["pirq"] for b in guest.xen()["bindings"]}
    assert entries == dict(zip((0, 1, 2, 7), r.pirqs))
    assert guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE) and guest.intx_disabled(G_NVME)

    off = guest.front.disable_msix(G_NVME)
    assert off.err == Err.success
    assert not guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE) and not guest.intx_disabled(G_NVME)
    assert guest.pirqs() == []


def test_msi_enable_and_disable(guest):
    r = guest.front.enable_msi(G_NIC)
    assert r.ok and r.pirqs[0] > 0, r
    assert guest.pirqs("msi") == [r.pirqs[0]]
    assert guest.enabled(G_NIC, CAP_MSI, MSI_ENABLE)
    assert guest.front.enable_msi(G_NIC).result == -errno.EINVAL        # already on: op_failed
    off = guest.front.disable_msi(G_NIC)
    assert off.err == Err.success and off.value == guest.hw[G_NIC].info.irq
    assert not guest.enabled(G_NIC, CAP_MSI, MSI_ENABLE)
    assert guest.pirqs() == []
    assert guest.front.enable_msi(G_NVME).result == -errno.EINVAL       # nvme has no MSI capability


def test_bad_requests_are_refused_and_map_nothing(guest):
    f = guest.front
    err, value, _ = f.msix_op(Op.enable_msix, G_NVME, 129, tuple(range(128)))
    assert (err, value) == (-errno.EINVAL, 129)
    assert f.enable_msix(G_NIC, [0, 5]).result == -errno.EINVAL          # entry outside the table of 5
    assert f.enable_msix(G_NIC, [1, 1]).result == -errno.EINVAL          # duplicate entry
    assert f.enable_msix(G_NIC, range(6)).result == -errno.ENOSPC        # more than the table holds
    assert f.enable_msix(G_NIC, []).result == -errno.EINVAL
    err, value, _ = f.msix_op(Op.enable_msix, BDF(0, 0, 9, 0), 1, (0,))
    assert err == Err.dev_not_found                                      # no such guest function
    assert f.op(Op.enable_multi_msi, 0, 0, G_NIC.devfn, info=4)[0] == Err.not_implemented
    assert guest.pirqs() == [] and not guest.enabled(G_NIC, CAP_MSIX, MSIX_ENABLE)

    msi = f.enable_msi(G_NIC)
    assert msi.ok
    err, value, _ = f.msix_op(Op.enable_msix, G_NIC, 1, (0,))
    assert (err, value) == (-errno.ENXIO, 1)                             # MSI-X while MSI is on
    assert guest.pirqs() == list(msi.pirqs)
    assert f.disable_msi(G_NIC).ok

    msix = f.enable_msix(G_NIC, [0])
    assert msix.ok
    assert f.enable_msix(G_NIC, [1]).result == -errno.EALREADY
    assert f.enable_msi(G_NIC).result == -errno.EINVAL                   # MSI while MSI-X is on
    assert guest.pirqs() == list(msix.pirqs)
    assert f.disable_msix(G_NIC).ok and guest.pirqs() == []
    assert guest.xen()["double_maps"] == []


def test_enable_disable_200_times_leaves_no_pirq_behind(guest):
    before = guest.pirqs()
    for i in range(200):
        r = guest.front.enable_msix(G_NVME, [0, 1, 2]) if i % 2 else guest.front.enable_msi(G_NIC)
        assert r.ok, (i, r)
        assert (guest.front.disable_msix(G_NVME) if i % 2 else guest.front.disable_msi(G_NIC)).ok
    assert guest.pirqs() == before
    assert guest.xen()["double_maps"] == []
    assert guest.front.timeouts == 0


def test_worker_killed_after_enable_keeps_the_guests_pirqs(guest):
    r = guest.front.enable_msix(G_NVME, [0, 1])
    assert r.ok
    pid = guest.worker_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: guest.worker_pid() != pid, what="a new worker")
    assert guest.pirqs() == sorted(r.pirqs)                  # nothing torn down, nothing mapped again
    assert guest.front.enable_msix(G_NVME, [0, 1]).result == -errno.EALREADY
    assert guest.front.disable_msix(G_NVME).ok              # the successor knows what to unmap
    assert guest.pirqs() == [] and not guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE)
    assert guest.xen()["double_maps"] == []


@pytest.mark.daemon(env={"PCIBACKD_FAILPOINTS": "msi-crash@1"})
def test_enable_pending_when_the_worker_died_is_answered_with_the_mapped_pirqs(faulty_dom0):
    guest = Guest(faulty_dom0)
    pid = guest.worker_pid()
    r = guest.front.enable_msix(G_NVME, [3, 4, 5])     # mapped, then the worker crashes before answering
    assert r.ok and guest.front.timeouts == 0, r
    assert guest.worker_pid() != pid
    assert "injected crash after an MSI enable" in faulty_dom0.log_tail(200)
    assert guest.pirqs() == sorted(r.pirqs)
    assert guest.xen()["double_maps"] == []
    assert guest.front.disable_msix(G_NVME).ok and guest.pirqs() == []


def test_hot_unplug_and_guest_destroy_unmap_and_release(guest):
    assert guest.front.enable_msix(G_NVME, [0, 1]).ok
    assert guest.xen()["prepared"] == sorted([NVME, NIC])
    assert guest.front.enable_msi(G_NIC).ok
    t, done = detach_in_background(guest.dom0.xenstored.socket_path, 1, NVME)
    wait_until(lambda: guest.front.follow(timeout=0.05) is not None and done.is_set(), timeout=15,
               what="the unplug to finish")
    t.join()
    assert [d.bdf for d in guest.front.devices] == [G_NIC]
    assert guest.pirqs("msix") == [] and not guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE)
    assert len(guest.pirqs("msi")) == 1
    wait_until(lambda: guest.xen()["prepared"] == [NIC], what="the unplugged function's MSI-X released")
    guest.dom0.toolstack.destroy(1, wait=False)
    wait_until(lambda: guest.pirqs() == [], what="the destroyed guest's PIRQs unmapped")
    assert not guest.enabled(G_NIC, CAP_MSI, MSI_ENABLE)
    wait_until(lambda: guest.xen()["prepared"] == [], what="the destroyed guest's functions released")


def _disabled_by(dev, cap_id: int, bit: int) -> list[int]:
    """The pids whose config writes turned ``bit`` of the capability's control word off."""
    ctrl = control_offset(find_capability(dev.read, cap_id))
    return [r.pid for r in dev.write_log() if r.offset == ctrl and r.before & bit and not r.after & bit]


def test_a_leaving_function_is_disabled_by_the_broker_not_by_its_reset(guest):
    """On unplug and destroy the supervisor's write turns MSI/MSI-X off (a reset first would leave it
    nothing to write).  Which of the scan and the worker's Leave gets there first is a race here; the
    order inside the worker is tested with the simulated Xen's trail in tests/unit/test_irq_teardown.py."""
    assert guest.front.enable_msix(G_NVME, [0, 1]).ok and guest.front.enable_msi(G_NIC).ok
    worker = guest.worker_pid()
    for dev in guest.hw.values():
        dev.clear_write_log()
    xs = XenStore(guest.dom0.xenstored.socket_path)
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (Toolstack(xs).detach(1, BDF.parse(NVME)), done.set()))
        t.start()
        wait_until(lambda: guest.front.follow(timeout=0.05) is not None and done.is_set(), timeout=15,
                   what="the unplug to finish")
        t.join()
    finally:
        xs.close()
    assert guest.pirqs("msix") == []
    assert [pid for pid in _disabled_by(guest.hw[G_NVME], CAP_MSIX, MSIX_ENABLE) if pid != worker]
    guest.dom0.toolstack.destroy(1, wait=False)
    wait_until(lambda: guest.pirqs() == [], what="the destroyed guest's PIRQs unmapped")
    wait_until(lambda: _disabled_by(guest.hw[G_NIC], CAP_MSI, MSI_ENABLE), what="MSI off")
    assert worker not in _disabled_by(guest.hw[G_NIC], CAP_MSI, MSI_ENABLE)


def test_supervisor_restart_adopts_the_journal(guest):
    r = guest.front.enable_msix(G_NVME, [0, 1])
    assert r.ok
    assert guest.dom0.stop_daemon(signal.SIGTERM) == 0
    guest.dom0.start_daemon()
    guest.worker_pid()
    assert guest.pirqs() == sorted(r.pirqs)
    assert guest.front.disable_msix(G_NVME).ok and guest.pirqs() == []


def test_a_disable_while_the_supervisor_is_away_is_caught_up(guest):
    r = guest.front.enable_msix(G_NVME, [0, 1])
    assert r.ok
    pid = guest.worker_pid()
    guest.dom0.stop_daemon(signal.SIGKILL)               # the worker lives on, serving
    assert guest.front.disable_msix(G_NVME).ok           # Linux: a disable always succeeds
    assert guest.pirqs() == sorted(r.pirqs)              # ... but nobody could unmap
    guest.dom0.start_daemon()
    wait_until(lambda: (g := guest.dom0.guest_status(1)) and g["adopted"] and g["pid"] == pid,
               what="the worker adopted")
    again = guest.front.enable_msix(G_NVME, [2])
    assert again.ok, again
    assert guest.pirqs() == list(again.pirqs) and guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE)
    assert guest.xen()["double_maps"] == []
    assert guest.front.disable_msix(G_NVME).ok and guest.pirqs() == []


def test_a_process_posing_as_the_worker_gets_no_pirqs(guest):
    """Right domid, pid and even token, but not the worker's socket identity: not served."""
    pid = guest.worker_pid()
    token = (guest.dom0.runtime / "workers" / "dom1.pid").read_text().split()[2]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(f"ipc://{guest.dom0.runtime / 'workers.sock'}")
    try:
        for tok in ("0" * 32, token):
            rogue.send(WorkerIrqRequest(1, pid, tok, "irq-1", MapMsix(1, BDF.parse(NVME), (0, 1))).to_json())
        assert not rogue.poll(1000)                      # no answer ...
        assert guest.front.enable_msi(G_NIC).ok          # ... while the real worker is served
        assert guest.pirqs("msix") == [] and not guest.enabled(G_NVME, CAP_MSIX, MSIX_ENABLE)
    finally:
        rogue.close(0)
        ctx.term()


def test_no_worker_holds_privcmd(guest):
    assert guest.front.enable_msix(G_NVME, [0]).ok
    pids = [g["pid"] for g in guest.dom0.status()["guests"] if g["pid"]]
    assert pids
    for pid in pids:
        fds = os.listdir(f"/proc/{pid}/fd")
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds
                   if os.path.exists(f"/proc/{pid}/fd/{fd}") or os.path.islink(f"/proc/{pid}/fd/{fd}")]
        assert not [t for t in targets if "privcmd" in t or t.startswith("/dev/xen")], targets


@pytest.fixture
def faulty_dom0(request):
    from simdom0.dom0 import SimDom0
    marker = request.node.get_closest_marker("daemon")
    kw = marker.kwargs if marker else {}
    dom0 = SimDom0(log_level="DEBUG", env=kw.get("env")).start()
    yield dom0
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("\n----- pcibackd log tail -----\n" + dom0.log_tail(80))
    dom0.stop()


def test_status_shows_each_functions_interrupts(guest):
    def devices():
        return {d["bdf"]: d for g in guest.dom0.status()["guests"] for d in g["devices"]}
    wait_until(lambda: NVME in devices() and NIC in devices(), what="both functions in the worker's report")
    assert (devices()[NVME]["msi"], devices()[NVME]["msix"]) == (None, {})
    assert devices()[NVME]["msix_prepared"] and devices()[NVME]["irq_error"] is None
    msix = guest.front.enable_msix(G_NVME, [0, 3])
    msi = guest.front.enable_msi(G_NIC)
    assert devices()[NVME]["msix"] == {"0": msix.pirqs[0], "3": msix.pirqs[1]}
    assert (devices()[NIC]["msi"], devices()[NIC]["msix"]) == (msi.pirqs[0], {})
    assert guest.front.enable_msix(G_NVME, [1]).result == -errno.EALREADY
    assert guest.front.enable_msi(G_NVME).result == -errno.EINVAL        # no MSI: op_failed
    wait_until(lambda: (devices()[NVME]["irq_error"] or {}).get("op") == "enable_msi",
               what="the failed enable in status")
    assert devices()[NVME]["irq_error"] == {"op": "enable_msi", "error": "XEN_PCI_ERR_op_failed", "cause": ""}
    text = [line.split() for line in render_status(guest.dom0.status()).splitlines()]
    text = [row[:2] + row[5:] for row in text]              # DOMID FUNCTION (GUEST PERMISSIVE DENIED) MSI MSI-X ...
    assert ["1", NVME, "off", f"0={msix.pirqs[0]}", f"3={msix.pirqs[1]}", "yes",
            "enable_msi", "XEN_PCI_ERR_op_failed"] in text
    assert ["1", NIC, "pirq", str(msi.pirqs[0]), "off", "yes", "-"] in text
    guest.front.disable_msix(G_NVME)
    assert devices()[NVME]["msix"] == {}


def test_status_names_the_brokers_refusal_behind_an_error(dom0):
    """Xen out of PIRQs: the guest gets -ENOSPC, status says the hypervisor refused."""
    dom0.add_device("nvme", NVME)
    dom0.create_guest(1, [NVME])
    front = dom0.frontend(1)
    [dev] = front.connect()
    assert front.enable_msix(dev.bdf, list(range(40))).result == -errno.ENOSPC   # Xen's pool: 32
    def error():
        return next((d["irq_error"] for g in dom0.status()["guests"] for d in g["devices"]
                     if d["bdf"] == NVME and d["irq_error"]), None)
    wait_until(lambda: (error() or {}).get("op") == "enable_msix", what="the error in status")
    assert error() == {"op": "enable_msix", "error": "-ENOSPC", "cause": "hypervisor/ENOSPC"}


def test_msix_on_an_sriov_vf(dom0):
    """A VF's own COMMAND never shows memory decoding (its physical function's counts) nor
    INTx-disable (a VF has no INTx), yet MSI-X maps and enables."""
    pf, vf = BDF(0, 1, 0, 0), BDF(0, 1, 0, 2)
    dom0.host.add("nvme-sriov", pf)
    hw = dom0.host.add("nvme-vf", vf, physfn=pf)
    dom0.create_guest(2, [str(vf)])
    front = dom0.frontend(2)
    [dev] = front.connect()
    hw.write(COMMAND, 2, hw.read(COMMAND, 2) | COMMAND_INTX_DISABLE)
    assert not hw.read(COMMAND, 2) & COMMAND_INTX_DISABLE     # a VF has no INTx: the bit is hardwired 0
    r = front.enable_msix(dev.bdf, [0, 1])
    assert r.ok, r                                             # no INTx-disable read-back to fail
    assert not hw.read(COMMAND, 2) & COMMAND_MEM
    assert hw.read(control_offset(find_capability(hw.read, CAP_MSIX)), 2) & MSIX_ENABLE
    path = physdev_state_path(dom0.sim_dir)
    bindings = read_state(path)["bindings"]
    assert sorted(b["pirq"] for b in bindings if b["domid"] == 2) == sorted(r.pirqs)
    assert front.disable_msix(dev.bdf).ok
    assert [b for b in read_state(path)["bindings"] if b["domid"] == 2] == []
