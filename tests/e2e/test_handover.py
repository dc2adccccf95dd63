"""A supervisor that leaves on SIGTERM hands its workers over (daemon/handover.py):
the next supervisor adopts them while the guests' ops keep succeeding; with no
successor they stop after handover_grace, leaving the guests' state for a later
start.  SIGINT stops them at once.  A worker booting while its supervisor dies
waits at the device gate for the successor (worker/devicegate.py)."""

from __future__ import annotations

import signal

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.wire.paths import backend_path
from helpers import Traffic
from simdom0.dom0 import SimDom0
from waiting import process_gone, wait_until

G0 = BDF(0, 0, 0, 0)
EDU, TESTDEV = 0x1234, 0x1b36


@pytest.fixture
def dom0(request):
    marker = request.node.get_closest_marker("daemon")
    kw = marker.kwargs if marker else {}
    d = SimDom0(log_level="DEBUG", config=kw.get("config"), env=kw.get("env")).start(daemon=False)
    d.add_device("edu", "0000:00:05.0")
    d.add_device("pci-testdev", "0000:00:06.0")
    yield d
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("\n----- pcibackd log tail -----\n" + d.log_tail(120))
    d.stop()


def two_guests(dom0: SimDom0):
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.create_guest(2, ["0000:00:06.0"])
    dom0.start_daemon()
    fronts = dom0.frontend(1), dom0.frontend(2)
    for f in fronts:
        f.op_timeout = 60        # an op answered late is a finding, a lost one the failure
        assert len(f.connect()) == 1
    return fronts


def guest(dom0: SimDom0, domid: int, pred, what: str, timeout: float = 30.0) -> dict:
    def match():
        try:
            g = dom0.guest_status(domid)
        except Exception:        # between two supervisors
            return None
        return g if g is not None and pred(g) else None
    return wait_until(match, timeout=timeout, what=lambda: f"dom{domid}: {what}\n{dom0.log_tail(30)}")


def running(g: dict) -> bool:
    return g["worker_state"] == "RUNNING" and g["xenbus_state"] == S.Connected


def test_sigterm_hands_the_workers_to_the_next_supervisor(dom0):
    f1, f2 = two_guests(dom0)
    pids = {d: guest(dom0, d, running, "running")["pid"] for d in (1, 2)}
    with Traffic(f1, EDU) as traffic:
        assert dom0.stop_daemon(signal.SIGTERM) == 0
        assert not any(process_gone(p) for p in pids.values())     # left serving
        traffic.wait_more()                                              # ... with no supervisor at all
        dom0.start_daemon()
        for d in (1, 2):
            g = guest(dom0, d, lambda g: g["adopted"] and running(g), "adopted and running")
            assert g["pid"] == pids[d] and g["restarts"] == 0, g
        traffic.wait_more()
    assert traffic.bad == 0 and f1.timeouts == 0
    assert f1.state() == S.Connected and dom0.xs.read(f"{backend_path(1)}/state") == "4"
    assert f2.conf_read(G0, 0, 2) == (Err.success, TESTDEV)
    log = dom0.log_tail(0)
    assert "handing 2 worker(s) over" in log and log.count("a new supervisor took over") == 2, log
    print(f"\nSIGTERM and a new supervisor: {traffic.ops} ops of dom1, none failed, "
          f"the slowest {traffic.slowest:.3f} s")


@pytest.mark.daemon(config={"handover_grace": 1.0})
def test_sigterm_without_a_successor_stops_the_workers_after_the_grace(dom0):
    f1, f2 = two_guests(dom0)
    pids = {d: guest(dom0, d, running, "running")["pid"] for d in (1, 2)}
    assert dom0.stop_daemon(signal.SIGTERM) == 0
    wait_until(lambda: all(process_gone(p) for p in pids.values()), timeout=30,
               what=lambda: f"the handed-over workers to stop\n{dom0.log_tail(20)}")
    assert "no supervisor took over within the handover grace" in dom0.log_tail(0)
    for d in (1, 2):          # their state left for a later start: nothing changed for the guests
        assert dom0.xs.read(f"{backend_path(d)}/state") == "4"
    assert f1.state() == S.Connected
    dom0.start_daemon()
    for d in (1, 2):
        g = guest(dom0, d, running, "resumed")
        assert g["pid"] != pids[d] and not g["adopted"], g
    assert f1.conf_read(G0, 0, 2) == (Err.success, EDU) and f1.state() == S.Connected
    assert f2.conf_read(G0, 0, 2) == (Err.success, TESTDEV)


def test_sigint_stops_the_workers_at_once(dom0):
    f1, _ = two_guests(dom0)
    pids = {d: guest(dom0, d, running, "running")["pid"] for d in (1, 2)}
    assert dom0.stop_daemon(signal.SIGINT) == 0
    assert all(process_gone(p) for p in pids.values())       # stopped before the supervisor exited
    assert dom0.xs.read(f"{backend_path(1)}/state") == "4" and f1.state() == S.Connected


@pytest.mark.daemon(env={"PCIBACKD_FAILPOINTS": "boot-slow@1"}, config={"orphan_grace": 60.0})
def test_a_worker_booting_when_its_supervisor_dies_waits_for_the_successor(dom0):
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.start_daemon()
    pid = guest(dom0, 1, lambda g: g["pid"] is not None and g["worker_state"] == "STARTING", "booting")["pid"]
    dom0.stop_daemon(signal.SIGKILL)
    wait_until(lambda: "device gate not answering" in dom0.log_tail(0), timeout=30,
               what=lambda: f"the worker at the dead supervisor's gate\n{dom0.log_tail(20)}")
    assert not process_gone(pid)
    dom0.start_daemon()
    g = guest(dom0, 1, lambda g: g["worker_state"] == "RUNNING" and g["devices"], "adopted, its device exported")
    assert g["pid"] == pid and g["adopted"] and g["xenbus_state"] == S.Initialised, g
    assert [d["bdf"] for d in g["devices"]] == ["0000:00:05.0"]
    front = dom0.frontend(1)
    assert len(front.connect()) == 1
    assert front.conf_read(G0, 0, 2) == (Err.success, EDU)
    assert dom0.guest_status(1)["pid"] == pid


@pytest.mark.daemon(config={"heartbeat_interval": 300.0, "heartbeat_timeout": 900.0, "boot_timeout": 900.0,
                            "orphan_grace": 1000.0})
def test_an_adopted_idle_worker_reports_at_once_and_runs(dom0):
    """A worker's link reconnecting to a new supervisor makes it report at once, not at its
    next keepalive (here 300 s away): the successor has it RUNNING, not STARTING."""
    f1, _ = two_guests(dom0)
    pids = {d: guest(dom0, d, running, "running")["pid"] for d in (1, 2)}
    dom0.stop_daemon(signal.SIGKILL)
    dom0.start_daemon()
    for d in (1, 2):
        g = guest(dom0, d, lambda g: g["adopted"] and running(g), "adopted and RUNNING", timeout=60)
        assert g["pid"] == pids[d] and g["devices"], g
    assert f1.conf_read(G0, 0, 2) == (Err.success, EDU)
