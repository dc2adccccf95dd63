"""Hostile xenstore against the real daemon: garbage device lists, a frontend
flapping out of order, the backend directory vanishing mid-connect.  Each
gets an error node or an ignored input with a log line; never a crash, never
an effect on another guest."""

from __future__ import annotations


import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.wire.paths import backend_path, error_path, frontend_path
from pcibackd.xenstore.toolstack import wait_for_value
from waiting import wait_until

G0 = BDF(0, 0, 0, 0)


@pytest.fixture
def bystander(dom0):
    """Guest 2, connected, whose service must never be disturbed."""
    dom0.add_device("pci-testdev", "0000:00:06.0")
    dom0.create_guest(2, ["0000:00:06.0"])
    f = dom0.frontend(2)
    f.connect()
    # Served ops do not mean the supervisor has its first beat yet (STARTING until then).
    wait_until(lambda: dom0.guest_status(2)["worker_state"] == "RUNNING", what="dom2's worker RUNNING")
    return f


def still_fine(dom0, bystander):
    assert dom0.daemon.poll() is None
    assert bystander.conf_read(G0, 0, 2) == (Err.success, 0x1b36)
    assert dom0.guest_status(2)["restarts"] == 0


def raw_backend(dom0, domid, **nodes):
    """A backend directory written by a broken toolstack, in one transaction."""
    be, fe = backend_path(domid), frontend_path(domid)
    dom0.toolstack.create_domain(domid, f"hostile{domid}")

    def tx(t):
        for k, v in {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": "1", **nodes}.items():
            t.write(f"{be}/{k}", v)
        t.set_perms(be, ["n0", f"r{domid}"])
        t.write(f"{fe}/backend", be)
        t.write(f"{fe}/backend-id", "0")
        t.write(f"{fe}/state", "1")
        t.set_perms(fe, [f"n{domid}", "r0"])
    dom0.xs.run_transaction(tx)


@pytest.mark.parametrize("nodes,needle", [
    ({"num_devs": "-3", "dev-0": "0000:00:05.0", "state-0": "1"}, "number of devices"),
    ({"num_devs": "99999999999", "dev-0": "0000:00:05.0", "state-0": "1"}, "number of devices"),
    ({"num_devs": "two", "dev-0": "0000:00:05.0", "state-0": "1"}, "number of devices"),
    ({"num_devs": "1", "dev-0": "0000:00:05", "state-0": "1"}, "pci device configuration"),
    ({"num_devs": "1", "dev-0": "../../../etc", "state-0": "1"}, "pci device configuration"),
])
def test_garbage_device_list_is_fatal(dom0, bystander, nodes, needle):
    dom0.add_device("edu", "0000:00:05.0")
    raw_backend(dom0, 1, **nodes)
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", str(int(S.Closing)), 10)
    assert needle in dom0.xs.read(error_path(1))
    still_fine(dom0, bystander)


def test_unknown_options_are_logged_and_ignored(dom0, bystander):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"], opts="permissive=0,evil_knob=1,rdm_policy=strict")
    f = dom0.frontend(1)
    assert len(f.connect()) == 1
    assert "unknown option 'evil_knob=1' ignored" in dom0.log_tail(200)
    still_fine(dom0, bystander)


def test_frontend_flapping_out_of_order(dom0, bystander):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", "3", 10)
    fe = frontend_path(1)
    for st in ["4", "8", "7", "2", "9", "-1", "x", "4", "1", "4"]:
        dom0.xs.write(f"{fe}/state", st)
    # a well-behaved frontend arriving afterwards still connects
    f = dom0.frontend(1)
    assert len(f.connect()) == 1
    assert f.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    still_fine(dom0, bystander)


def test_backend_directory_deleted_mid_connect(dom0, bystander):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", "3", 10)
    dom0.xs.rm(backend_path(1))
    wait_until(lambda: dom0.guest_status(1) is None, what="dom1's worker gone")
    # the device was released: another guest can have it
    dom0.create_guest(3, ["0000:00:05.0"])
    assert len(dom0.frontend(3).connect()) == 1
    still_fine(dom0, bystander)


def test_non_domid_backend_entries_ignored(dom0, bystander):
    dom0.xs.write("/local/domain/0/backend/pci/evil/0/frontend", "/local/domain/1/device/pci/0")
    dom0.xs.write("/local/domain/0/backend/pci/0/0/frontend", "/local/domain/0/device/pci/0")
    dom0.xs.write("/local/domain/0/backend/pci/7/0/frontend", "/local/domain/8/device/pci/0")  # not its own
    wait_until(lambda: dom0.xs.read(error_path(7)) is not None, what="an error node for backend 7")
    assert "bad frontend path" in dom0.xs.read(error_path(7))
    assert {g["domid"] for g in dom0.status()["guests"]} <= {2, 7}
    assert dom0.log_tail(200).count("not a domid") == 1          # once, not on every watch event
    still_fine(dom0, bystander)


def test_bridge_refused_on_virtual_bus(dom0, bystander):
    dom0.add_device("pci-bridge", "0000:00:02.0")
    dom0.create_guest(1, ["0000:00:02.0"])
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", str(int(S.Closing)), 10)
    assert "can't export bridges" in dom0.xs.read(error_path(1))
    still_fine(dom0, bystander)


def test_frontend_directory_disappears(dom0, bystander):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    f = dom0.frontend(1)
    f.connect()
    pid = dom0.guest_status(1)["pid"]
    dom0.xs.rm(frontend_path(1))            # the guest died without closing
    wait_until(lambda: (g := dom0.guest_status(1)) is None or g["pid"] != pid,
               what=f"dom1's worker (pid {pid}) gone or replaced")
    g = dom0.guest_status(1)
    assert g is None or (g["worker_state"] == "EXITED" and g["pid"] is None)
    assert "frontend gone" in dom0.log_tail(200)
    still_fine(dom0, bystander)


def test_worker_socket_flood_is_contained(dom0, bystander):
    """A process speaking for dom2 on the worker socket floods the supervisor."""
    import json
    import zmq
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)       # its own identity: ROUTER would refuse a duplicate "dom2"
    rogue.setsockopt(zmq.SNDHWM, 0)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(f"ipc://{dom0.runtime / 'workers.sock'}")
    junk = [b"\xff" * 100, b"{}", json.dumps({"domid": 2, "pid": 1, "type": "beat"}).encode(),
            json.dumps({"domid": 2, "pid": dom0.guest_status(2)["pid"], "type": "beat", "final": True}).encode(),
            json.dumps({"domid": "x"}).encode(), b"x" * 70000]
    try:
        for i in range(20000):
            rogue.send(junk[i % len(junk)], zmq.NOBLOCK)
    except zmq.Again:
        pass
    from pcibackd.control.client import call
    assert call(dom0.runtime, "status", timeout=15)["status"] == "ok"      # raises if it never answers
    still_fine(dom0, bystander)
    g = dom0.guest_status(2)
    assert g["worker_state"] == "RUNNING" and g["pid"] != 1      # the forged beats were not believed
    assert 1 <= dom0.log_tail(10000).count("malformed message on the worker socket") <= 16   # log2, not 20000
    rogue.close(0)
    ctx.term()


def test_destroyed_domain_backend_nodes_are_removed(dom0, bystander):
    """`xl destroy` of a guest whose devices our toolstack attached: libxl does
    not know them, removes only /local/domain/<domid>; the daemon cleans up."""
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.frontend(1).connect()
    dom0.xs.rm("/local/domain/1")
    wait_until(lambda: not dom0.xs.exists("/local/domain/0/backend/pci/1") and dom0.guest_status(1) is None,
               what="dom1's backend nodes removed and its worker gone")
    still_fine(dom0, bystander)
    dom0.create_guest(3, ["0000:00:05.0"])          # the device is free again
    assert len(dom0.frontend(3).connect()) == 1
