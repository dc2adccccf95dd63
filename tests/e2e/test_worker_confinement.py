"""A worker-like process confined exactly as a worker confines itself (Landlock
before its threads, then no capabilities, then seccomp), beside a running
daemon: it tries what a guest that took over its worker would try, and fails."""

from __future__ import annotations

import os
import signal
import socket

import psutil

from helpers import Refusals, connect_unix, in_child
from pcibackd.hostpci.sysfs import devices_dir
from pcibackd.worker import landlock, privileges, seccomp
from pcibackd.worker.confine import confine_paths
from pcibackd.worker.main import WorkerConfig
from waiting import wait_until

THEIRS = "0000:00:06.0"


def _running_guest(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.add_device("edu", THEIRS)
    dom0.create_guest(1, ["0000:00:05.0"])
    dom0.create_guest(2, [THEIRS])
    dom0.frontend(1).connect()
    return wait_until(lambda: (g := dom0.guest_status(1)) and g["worker_state"] == "RUNNING" and g,
                      what="a RUNNING worker for dom1")


def _forkserver_listener(worker_pid: int) -> str:
    forkserver = psutil.Process(worker_pid).parent()
    return next(c.laddr for c in forkserver.net_connections(kind="unix") if c.laddr)


def _attempts(dom0, listener: str) -> list[str]:
    """Each thing that should fail and did not."""
    refusals = Refusals()
    must_fail, connect = refusals.must_fail, connect_unix

    must_fail("open another function's config for writing",
              lambda: os.close(os.open(devices_dir(dom0.sim_dir / "pci") / THEIRS / "config", os.O_RDWR)))
    must_fail("connect to the control socket", lambda: connect(dom0.runtime / "control.sock"))
    must_fail("connect to the fork server (root, every capability)", lambda: connect(listener))
    must_fail("take another function's claim", lambda: os.close(os.open(dom0.runtime / "claims" / f"{THEIRS}.lock",
                                                                       os.O_RDONLY)))
    must_fail("read a pid file", lambda: open(dom0.runtime / "workers" / "dom2.pid").close())
    must_fail("pair a xenstore connection for another guest",
              lambda: connect(dom0.runtime / "xsgate" / "control.sock", socket.SOCK_SEQPACKET))
    must_fail("write outside its state", lambda: open(dom0.runtime / "planted", "w").close())
    must_fail("read /etc/shadow", lambda: open("/etc/shadow", "rb").close())
    must_fail("list /root", lambda: os.listdir("/root"))
    must_fail("exec", lambda: os.execv("/bin/true", ["true"]))
    if landlock.abi() >= 6:
        must_fail("signal the supervisor", lambda: os.kill(dom0.daemon.pid, signal.SIGSTOP))
    return refusals.unexpected


def test_a_confined_worker_reaches_nothing_of_other_guests_or_the_daemon(dom0):
    g = _running_guest(dom0)
    wait_until(lambda: dom0.guest_status(2) and dom0.guest_status(2)["worker_state"] == "RUNNING",
               what="dom2's worker")
    listener = _forkserver_listener(g["pid"])
    cfg = WorkerConfig(domid=3, backend_path="/local/domain/0/backend/pci/3/0", platform=f"sim:{dom0.sim_dir}",
                       state_dir=str(dom0.runtime), device_gate=str(dom0.runtime / "devices.sock"))

    def attempts() -> list[str]:
        confine_paths(cfg)
        privileges.drop()
        seccomp.install()
        return _attempts(dom0, listener)
    assert in_child(attempts) == ""
    assert dom0.guest_status(1)["worker_state"] == "RUNNING"        # the daemon never noticed


def test_the_forkserver_and_private_runtime_dirs_are_locked_away(dom0):
    g = _running_guest(dom0)
    assert os.stat(os.path.dirname(_forkserver_listener(g["pid"]))).st_uid == privileges.LOCKED_UID
    for name in ("control.sock", "claims", "workers", "irq", "xsgate"):
        assert os.stat(dom0.runtime / name).st_uid == privileges.LOCKED_UID, name
