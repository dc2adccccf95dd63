"""Hot-plug, hot-unplug with renumbering, and teardown, against the real
oxenstored with the Python pcifront, in both topology modes."""

from __future__ import annotations

import threading
import time

import pytest

from pcibackd.worker.xenbus_nodes import parse_vdev
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.wire.paths import backend_path
from pcibackd.xenstore.toolstack import Toolstack
from pcibackd.xenstore.client import XenStore
from waiting import wait_until

DEVS = [("edu", "0000:00:05.0"), ("pci-testdev", "0000:00:06.0"), ("e1000e", "0000:02:00.0"),
        ("rtl8139", "0000:02:03.0")]


def in_thread(dom0, fn, *args):
    """Run a blocking toolstack call on its own xenstore connection."""
    box = {}

    def run():
        xs = XenStore(dom0.xenstored.socket_path)
        try:
            box["result"] = fn(Toolstack(xs), *args)
        except BaseException as exc:       # re-raised in the test thread
            box["error"] = exc
        finally:
            xs.close()
    t = threading.Thread(target=run)
    t.start()
    return t, box


def pump(front, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    changes = []
    while not until():
        assert time.monotonic() < deadline, f"front {front.state()} back {front.backend_state()}"
        changes += front.follow(timeout=0.05)
    return changes


def finish(t, box):
    t.join(15)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.mark.parametrize("mode", ["vpci", "passthrough"])
def test_hotplug_unplug_renumber(request, mode):
    dom0 = request.getfixturevalue("dom0" if mode == "vpci" else "dom0_passthrough")
    for dump, bdf in DEVS:
        dom0.add_device(dump, bdf)
    dom0.create_guest(1, [DEVS[0][1], DEVS[1][1]])
    front = dom0.frontend(1)
    front.connect()
    assert len(front.devices) == 2
    be = backend_path(1)

    # hot-plug two more, one transaction
    t, box = in_thread(dom0, lambda ts: ts.attach(1, [BDF.parse(DEVS[2][1]), BDF.parse(DEVS[3][1])]))
    changes = pump(front, lambda: len(front.devices) == 4 and front.backend_state() == S.Connected)
    assert finish(t, box) == [2, 3]
    assert sum(c.startswith("+") for c in changes) == 2
    assert dom0.xs.read(f"{be}/state-2") == "3" and dom0.xs.read(f"{be}/state-3") == "3"
    if mode == "passthrough":
        assert sorted(str(d.bdf) for d in front.devices) == sorted(b for _, b in DEVS)
        assert dom0.xs.read(f"{be}/root_num") == "2"
    else:
        assert [str(d.bdf) for d in front.devices] == [f"0000:00:0{i}.0" for i in range(4)]

    # hot-unplug index 1: the toolstack renumbers 2->1, 3->2
    gone = DEVS[1]
    gone_addr = parse_vdev(dom0.xs.read(f"{be}/vdev-1"))
    kept_addresses = [d.bdf for d in front.devices if d.bdf != gone_addr]
    assert len(kept_addresses) == 3
    t, box = in_thread(dom0, lambda ts: ts.detach(1, BDF.parse(gone[1])))
    pump(front, lambda: len(front.devices) == 3 and not t.is_alive())
    finish(t, box)
    assert dom0.xs.read(f"{be}/num_devs") == "3"
    assert [dom0.xs.read(f"{be}/dev-{i}") for i in range(3)] == [DEVS[0][1], DEVS[2][1], DEVS[3][1]]
    assert dom0.xs.read(f"{be}/dev-3") is None
    # the remaining devices keep their guest addresses and still answer
    assert {str(d.bdf) for d in front.devices} == {str(b) for b in kept_addresses}
    for d in front.devices:
        assert front.conf_read(d.bdf, 0, 2)[0] == Err.success
    # a device that was unplugged can be given to another guest now
    dom0.create_guest(2, [gone[1]])
    other = dom0.frontend(2)
    assert len(other.connect()) == 1

    # hot-plug after the renumbering lands at the next free index
    dom0.add_device("intel-hda", "0000:00:07.0")
    t, box = in_thread(dom0, lambda ts: ts.attach(1, BDF.parse("0000:00:07.0")))
    pump(front, lambda: len(front.devices) == 4 and not t.is_alive())
    assert finish(t, box) == [3]

    # a worker restart after renumbering keeps every device at its guest address
    before = {d.bdf: front.conf_read(d.bdf, 0, 4) for d in front.devices}
    import os
    import signal
    pid = dom0.guest_status(1)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (g := dom0.guest_status(1))["pid"] not in (None, pid) and g["worker_state"] == "RUNNING",
               what="a new RUNNING worker for dom1")
    assert {b: front.conf_read(b, 0, 4) for b in before} == before
    vdevs = [dom0.xs.read(f"{be}/vdev-{i}") for i in range(4)]
    assert len(set(vdevs)) == 4 and None not in vdevs

    # teardown: the frontend follows, the worker exits, nodes go
    t, box = in_thread(dom0, lambda ts: ts.destroy(1))
    pump(front, lambda: front.state() in (S.Closed, None))
    assert finish(t, box) is True
    wait_until(lambda: dom0.guest_status(1) is None, what="dom1's worker gone")
    assert dom0.xs.ls(be) == []
    # dom2 untouched: its worker reaches RUNNING (first beat) and never restarted
    wait_until(lambda: dom0.guest_status(2)["worker_state"] == "RUNNING", what="dom2's worker RUNNING")
    assert dom0.guest_status(2)["restarts"] == 0


def test_hotplug_of_busy_device_is_fatal_and_isolated(dom0):
    for dump, bdf in DEVS[:2]:
        dom0.add_device(dump, bdf)
    dom0.create_guest(1, [DEVS[0][1]])
    dom0.create_guest(2, [DEVS[1][1]])
    f1, f2 = dom0.frontend(1), dom0.frontend(2)
    f1.connect(), f2.connect()
    t, box = in_thread(dom0, lambda ts: ts.attach(1, BDF.parse(DEVS[1][1])))   # dom2's device
    pump(f1, lambda: f1.backend_state() == S.Closing or f1.state() == S.Closed)
    finish(t, box)
    assert "already assigned" in dom0.xs.read("/local/domain/0/error/backend/pci/1/0/error")
    assert f2.conf_read(BDF(0, 0, 0, 0), 0, 2) == (Err.success, 0x1b36)


def test_unplug_guest_lets_go_before_the_backend_removes(dom0):
    """pcifront_detach_devices: a ``state-N=5`` device leaves the guest before
    the guest answers Reconfiguring, so no op of the guest meets a removed device."""
    for dump, bdf in DEVS[:2]:
        dom0.add_device(dump, bdf)
    dom0.create_guest(1, [DEVS[0][1], DEVS[1][1]])
    front = dom0.frontend(1)
    front.connect()
    leaving = parse_vdev(dom0.xs.read(f"{backend_path(1)}/vdev-0"))
    t, box = in_thread(dom0, lambda ts: ts.detach(1, BDF.parse(DEVS[0][1])))
    answers, seen_reconfiguring = [], False
    deadline = time.monotonic() + 10
    while t.is_alive() or front.backend_state() != S.Connected:
        assert time.monotonic() < deadline, f"front {front.state()} back {front.backend_state()}"
        front.follow(timeout=0.01)
        if front.state() == S.Reconfiguring:
            seen_reconfiguring = True
            assert leaving not in [d.bdf for d in front.devices]
        answers += [front.conf_read(d.bdf, 0, 4)[0] for d in front.devices]
    finish(t, box)
    assert seen_reconfiguring and answers and set(answers) == {Err.success}
    assert [d.bdf for d in front.devices] == [parse_vdev(dom0.xs.read(f"{backend_path(1)}/vdev-0"))]
    # The removed address is answered as Linux pciback answers it, and the guest knows why.
    assert front.conf_read(leaving, 0, 4)[0] == Err.dev_not_found and front.leaving(leaving)


def test_hotplug_before_the_guest_saw_connected(dom0):
    """A hot-plug that starts between the backend's Connected and the guest
    reading it (Linux: "Handle skipped connect"): the guest still connects."""
    for dump, bdf in DEVS[:2]:
        dom0.add_device(dump, bdf)
    dom0.create_guest(1, [DEVS[0][1]])
    front = dom0.frontend(1)
    wait_for_backend = front._wait

    def wait_then_hotplug(cond, timeout):
        wait_for_backend(cond, timeout)
        dom0.toolstack.attach(1, BDF.parse(DEVS[1][1]))     # backend Connected: writes 7 now
    front._wait = wait_then_hotplug
    assert len(front.connect()) == 1 and front.state() == S.Reconfiguring
    changes = pump(front, lambda: front.state() == S.Connected and front.backend_state() == S.Connected)
    assert len(front.devices) == 2 and sum(c.startswith("+") for c in changes) == 1


def test_destroy_while_the_guest_looks_away(dom0):
    """The toolstack may remove both directories before the guest follows
    (the backend closes at once on ``online=0``): the guest then lets go like
    Linux xenbus unregistering pcifront, instead of serving a dead page."""
    dom0.add_device(*DEVS[0])
    dom0.create_guest(1, [DEVS[0][1]])
    front = dom0.frontend(1)
    (dev,) = front.connect()
    assert dom0.toolstack.destroy(1) is True
    assert front.state() is None and front.backend_state() is None
    assert front.follow() == [f"- {dev.lspci_line()}"]
    assert front.page is None and front.devices == [] and front.leaving(dev.bdf)
