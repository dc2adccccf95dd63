"""End to end on the simulated dom0: real oxenstored, the daemon, the Python
pcifront; connect, enumerate, ops, and the bad-input cases of the skeleton."""

from __future__ import annotations

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op, XenbusState as S
from pcibackd.wire.paths import backend_path, error_path, frontend_path
from pcibackd.xenstore.toolstack import wait_for_value
from waiting import process_gone, wait_until

EDU = ("edu", "0000:00:05.0")
TESTDEV = ("pci-testdev", "0000:00:06.0")
E1000E = ("e1000e", "0000:02:00.0")


def setup_guest(dom0, domid, devices):
    for dump, bdf in devices:
        dom0.add_device(dump, bdf)
    dom0.create_guest(domid, [bdf for _, bdf in devices])


def ids(dom0, bdf):
    info = dom0.host.open(BDF.parse(bdf)).info
    return info.vendor, info.device


def test_connect_and_enumerate_equals_attached(dom0):
    setup_guest(dom0, 1, [EDU, E1000E])
    front = dom0.frontend(1)
    devices = front.connect()
    assert [(d.vendor, d.device) for d in devices] == [ids(dom0, EDU[1]), ids(dom0, E1000E[1])]
    assert [str(d.bdf) for d in devices] == ["0000:00:00.0", "0000:00:01.0"]    # vpci slots
    be = backend_path(1)
    assert dom0.xs.read(f"{be}/state") == "4" and front.state() == S.Connected
    assert dom0.xs.read(f"{be}/vdev-0") == "0000:00:00.00" and dom0.xs.read(f"{be}/state-0") == "3"
    assert dom0.xs.read(f"{be}/root_num") == "1" and dom0.xs.read(f"{be}/root-0") == "0000:00"
    # permissions exactly as libxl: backend owned by dom0 and readable by the guest
    # ...and so is every node in it (children inherit at creation), incl. what the backend publishes
    for node in ["", "/state", "/frontend", "/online", "/num_devs", "/dev-0", "/state-0", "/vdev-0", "/root_num"]:
        assert dom0.xs.get_perms(be + node) == ["n0", "r1"], node
    for node in ["", "/backend", "/backend-id"]:          # toolstack-written frontend nodes
        assert dom0.xs.get_perms(frontend_path(1) + node) == ["n1", "r0"], node


def test_passthrough_topology_uses_real_addresses(dom0_passthrough):
    dom0 = dom0_passthrough
    setup_guest(dom0, 3, [E1000E])
    devices = dom0.frontend(3).connect()
    assert [str(d.bdf) for d in devices] == [E1000E[1]]
    assert dom0.xs.read(f"{backend_path(3)}/root-0") == "0000:02"


def test_ops_status_and_two_guests_isolated(dom0):
    setup_guest(dom0, 1, [EDU])
    setup_guest(dom0, 2, [TESTDEV])
    f1, f2 = dom0.frontend(1), dom0.frontend(2)
    f1.connect(), f2.connect()
    g = BDF(0, 0, 0, 0)
    assert f1.conf_read(g, 0, 2) == (Err.success, 0x1234)
    assert f2.conf_read(g, 0, 2) == (Err.success, 0x1b36)
    for _ in range(50):
        f1.conf_read(g, 8, 4)
    st = {x["domid"]: x for x in _wait_beats(dom0, {1: 50 + 256, 2: 1})}   # a beat from after the reads
    assert st[1]["served"]["conf_read"] >= 50 + 256   # the scan probed every devfn
    assert st[1]["xenbus_state"] == S.Connected and st[1]["worker_state"] == "RUNNING"
    assert st[1]["pid"] != st[2]["pid"]
    assert [(d["bdf"], d["vbdf"], d["permissive"]) for d in st[1]["devices"]] == [(EDU[1], "0000:00:00.0", False)]


def _wait_beats(dom0, minimum):
    def beats():
        guests = dom0.status()["guests"]
        served = {g["domid"]: sum(g["served"].values()) for g in guests}
        return all(served.get(domid, -1) >= n for domid, n in minimum.items()) and guests
    return wait_until(beats, what=lambda: f"heartbeats with {minimum} ops served, have {dom0.status()['guests']}",
                      interval=0.1)


@pytest.mark.parametrize("offset,size,err", [
    (0, 3, Err.invalid_offset), (1, 2, Err.invalid_offset), (2, 4, Err.invalid_offset),
    (-4, 4, Err.invalid_offset), (256, 4, Err.invalid_offset), (0x7FFFFFFC, 4, Err.invalid_offset),
    (0, 0, Err.invalid_offset), (0, -1, Err.invalid_offset), (252, 4, Err.success), (255, 1, Err.success),
])
def test_bad_access_sizes_and_offsets(dom0, offset, size, err):
    setup_guest(dom0, 1, [EDU])          # edu has a 256-byte config space
    front = dom0.frontend(1)
    front.connect()
    assert front.op(Op.conf_read, 0, 0, 0, offset, size)[0] == err


@pytest.mark.parametrize("domain,bus,devfn", [(0, 0, 8), (0, 0, 0x100), (1, 0, 0), (0, 1, 0), (0xFFFFFFFF, 0, 0)])
def test_unknown_device(dom0, domain, bus, devfn):
    setup_guest(dom0, 1, [EDU])
    front = dom0.frontend(1)
    front.connect()
    assert front.op(Op.conf_read, domain, bus, devfn, 0, 4)[0] == Err.dev_not_found


@pytest.mark.parametrize("cmd", [11, 99, 0xFFFFFFFF, Op.enable_multi_msi])
def test_unknown_cmd(dom0, cmd):
    setup_guest(dom0, 1, [EDU])
    front = dom0.frontend(1)
    front.connect()
    assert front.op(cmd, 0, 0, 0, 0, 4)[0] == Err.not_implemented


# --- hostile frontends: error node, Closing, one log line, others untouched ----

def hostile_publish(dom0, domid, **nodes):
    fe = frontend_path(domid)
    for k, v in nodes.items():
        if v is None:
            dom0.xs.rm(f"{fe}/{k}")
        else:
            dom0.xs.write(f"{fe}/{k}", v)
    dom0.xs.write(f"{fe}/state", "3")


@pytest.mark.parametrize("nodes,needle", [
    ({"magic": "8", "pci-op-ref": "1", "event-channel": "1"}, "version mismatch"),
    ({"magic": "", "pci-op-ref": "1", "event-channel": "1"}, "version mismatch"),
    ({"magic": "7", "pci-op-ref": "abc", "event-channel": "1"}, "pci-op-ref"),
    ({"magic": "7", "pci-op-ref": "-5", "event-channel": "1"}, "pci-op-ref"),
    ({"magic": "7", "pci-op-ref": "1", "event-channel": "99999999999"}, "pci-op-ref"),
    ({"magic": "7", "pci-op-ref": None, "event-channel": "1"}, "pci-op-ref"),
    ({"magic": "7", "pci-op-ref": "12345", "event-channel": "1"}, "MapRing"),     # no such grant
])
def test_hostile_frontend_nodes(dom0, nodes, needle):
    setup_guest(dom0, 1, [EDU])
    setup_guest(dom0, 2, [TESTDEV])
    good = dom0.frontend(2)
    good.connect()
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", "3", 10)
    hostile_publish(dom0, 1, **nodes)
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", str(int(S.Closing)), 10)
    err = dom0.xs.read(error_path(1))
    assert needle in err and err.split(" ", 1)[0].isdigit()
    # the other guest still works, and the daemon is alive
    assert good.conf_read(BDF(0, 0, 0, 0), 0, 2) == (Err.success, 0x1b36)
    assert dom0.daemon.poll() is None
    assert dom0.log_tail(200).count(needle) >= 1


def test_device_cannot_be_given_twice(dom0):
    setup_guest(dom0, 1, [EDU])
    first = dom0.frontend(1)
    first.connect()
    dom0.create_guest(2, [EDU[1]])          # the same host device to a second guest
    wait_for_value(dom0.xs, f"{backend_path(2)}/state", str(int(S.Closing)), 10)
    assert "already assigned" in dom0.xs.read(error_path(2))
    assert first.conf_read(BDF(0, 0, 0, 0), 0, 2) == (Err.success, 0x1234)


def test_unknown_device_bdf_is_fatal(dom0):
    dom0.create_guest(1, ["0000:09:1f.7"])     # nothing at that address
    wait_for_value(dom0.xs, f"{backend_path(1)}/state", str(int(S.Closing)), 10)
    assert "not an assignable device" in dom0.xs.read(error_path(1))


def test_teardown_and_worker_exit(dom0):
    setup_guest(dom0, 1, [EDU])
    front = dom0.frontend(1)
    front.connect()
    dev = dom0.host.open(BDF.parse(EDU[1]))
    power_on = dev.config_bytes()
    assert front.conf_write(BDF(0, 0, 0, 0), 0x04, 2, 0x0107) == Err.success   # the guest turns bus master on
    assert dev.read(0x04, 2) & 0x4
    pid = dom0.guest_status(1)["pid"]
    assert dom0.toolstack.destroy(1) is True           # backend reached Closed
    wait_until(lambda: dom0.guest_status(1) is None, what="dom1's worker gone")
    assert process_gone(pid)
    assert dev.config_bytes() == power_on           # reset before the claim was released
