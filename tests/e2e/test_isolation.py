"""What a worker is: forked from a thread-free spawner (not the threaded
supervisor), holding no capabilities, and inheriting none of the supervisor's
connections."""

from __future__ import annotations

import os

import psutil

from pcibackd.worker import privileges, seccomp
from waiting import wait_until


def connected_worker(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.frontend(1).connect()
    g = wait_until(lambda: (g := dom0.guest_status(1)) and g["worker_state"] == "RUNNING" and g,
                   what="a RUNNING worker for dom1")
    return g["pid"]


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_worker_forked_from_single_threaded_spawner(dom0):
    pid = connected_worker(dom0)
    worker = psutil.Process(pid)
    spawner = worker.parent()
    assert spawner.pid != dom0.daemon.pid                  # not forked from the supervisor
    assert spawner.parent().pid == dom0.daemon.pid         # ...but from its fork server
    assert spawner.num_threads() == 1
    assert psutil.Process(dom0.daemon.pid).num_threads() > 1   # the supervisor does have threads
    # no socket of the supervisor's (xenstore connection, ZeroMQ) is shared with the worker
    assert not (_socket_inodes(pid) & _socket_inodes(dom0.daemon.pid))


def test_worker_has_no_capabilities(dom0):
    pid = connected_worker(dom0)
    st = privileges.status(pid)
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0" * 16
    assert st["NoNewPrivs"] == "1"
    assert seccomp.mode(pid) == 2                          # under its seccomp filter
    # and it still serves its guest
    front = dom0.fronts[-1]
    assert front.conf_read(front.devices[0].bdf, 0, 2) == (0, 0x1234)
