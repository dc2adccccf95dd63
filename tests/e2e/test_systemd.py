"""`pcibackd run` under systemd conventions: READY=1 on a local NOTIFY_SOCKET
once the xenstore watch is up, STOPPING=1 on SIGTERM, exit 0."""

from __future__ import annotations

import signal
import socket

from simdom0.dom0 import SimDom0
from pcibackd.daemon import systemd


def test_notify_socket_protocol(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    with SimDom0(env={"NOTIFY_SOCKET": path}) as dom0:
        dom0.start(daemon=False)
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        dom0.start_daemon()
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and "STATUS=serving 1 guest(s)" in ready
        # the watch was up when READY was sent: the guest connects
        assert len(dom0.frontend(1).connect()) == 1
        assert dom0.stop_daemon(signal.SIGTERM) == 0
        msgs = []
        while "STOPPING=1" not in "".join(msgs):
            msgs.append(sock.recv(4096).decode())
    sock.close()


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_abstract_notify_socket(monkeypatch):
    import os
    name = f"pcibackd-test-notify-{os.getpid()}"      # unique: tests may run in parallel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert systemd.notify("WATCHDOG=1") is True
    assert sock.recv(64) == b"WATCHDOG=1"
    sock.close()


def test_watchdog_interval(monkeypatch):
    import os
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
