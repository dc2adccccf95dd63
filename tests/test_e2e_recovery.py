"""Crash isolation: a killed, crashing or hung worker is replaced, the op the
guest had pending is answered by the successor, other guests are untouched."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pcibackd.pcihost.bdf import BDF
from pcibackd.xen.pciif import Err, XenbusState as S
from pcibackd.xen.toolstack import backend_path

G0 = BDF(0, 0, 0, 0)


def two_guests(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.add_device("pci-testdev", "0000:00:06.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.create_guest(2, ["0000:00:06.0"])
    f1, f2 = dom0.frontend(1), dom0.frontend(2)
    f1.connect(), f2.connect()
    return f1, f2


def wait_guest(dom0, domid, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        g = dom0.guest_status(domid)
        if g is not None and pred(g):
            return g
        assert time.monotonic() < deadline, g
        time.sleep(0.05)


def op_in_thread(front, *args):
    box = {}
    t = threading.Thread(target=lambda: box.update(result=front.conf_read(*args)))
    t.start()
    return t, box


def test_kill9_with_op_pending_is_answered_by_successor(dom0):
    f1, f2 = two_guests(dom0)
    g = wait_guest(dom0, 1, lambda g: g["worker_state"] == "RUNNING")
    pid = g["pid"]
    os.kill(pid, signal.SIGSTOP)                  # freeze it so the op stays pending
    t, box = op_in_thread(f1, G0, 0, 4)
    deadline = time.monotonic() + 2
    while not f1.page.test_bit(0, 0):
        assert time.monotonic() < deadline
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(5)
    elapsed = time.monotonic() - t0
    assert box["result"] == (Err.success, 0x11E81234), "the guest saw an error, not a slow op"
    assert elapsed < 2.0 and f1.timeouts == 0
    g = wait_guest(dom0, 1, lambda g: g["pid"] not in (None, pid) and g["worker_state"] == "RUNNING")
    assert g["restarts"] == 1 and g["xenbus_state"] == S.Connected
    assert f1.state() == S.Connected and dom0.xs.read(f"{backend_path(1)}/state") == "4"
    assert f2.conf_read(G0, 0, 2) == (Err.success, 0x1b36)
    assert dom0.guest_status(2)["restarts"] == 0


def test_supervisor_sigterm_then_restart_picks_guests_up(dom0):
    f1, f2 = two_guests(dom0)
    old = wait_guest(dom0, 1, lambda g: g["worker_state"] == "RUNNING")["pid"]
    assert dom0.stop_daemon(signal.SIGTERM) == 0
    import psutil
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
    # nothing changed for the guests in xenstore
    assert dom0.xs.read(f"{backend_path(1)}/state") == "4" and f1.state() == S.Connected
    dom0.start_daemon()
    wait_guest(dom0, 1, lambda g: g["worker_state"] == "RUNNING" and g["xenbus_state"] == S.Connected)
    assert f1.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    assert f2.conf_read(G0, 0, 2) == (Err.success, 0x1b36)
