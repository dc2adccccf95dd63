"""Hostile and broken control clients against a running daemon: each gets an
error reply or loses its connection, and the daemon keeps serving everyone
else (other control clients and the guests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
from functools import cache

import psutil
import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from pcibackd.control.protocol import MAX_REQUEST, Errno
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err
from pcibackd.worker.privileges import LOCKED_UID

from test_control_commands import ROOT, ctl
from waiting import wait_until

EDU = "0000:00:05.0"
G0 = BDF(0, 0, 0, 0)
NOBODY = 65534


@pytest.fixture
def served(dom0):
    """The daemon with one connected guest, and a check that all is still well."""
    dom0.add_device("edu", EDU)
    dom0.create_guest(1, [EDU])
    front = dom0.frontend(1)
    front.connect()
    # Served ops do not mean the supervisor has its first beat yet (STARTING until then).
    wait_until(lambda: dom0.guest_status(1)["worker_state"] == "RUNNING", what="dom1's worker RUNNING")

    def still_well():
        assert dom0.daemon.poll() is None, dom0.log_tail()
        st = dom0.status(timeout=10)        # a stalled daemon never answers: this raises
        assert [g["worker_state"] for g in st["guests"]] == ["RUNNING"]
        assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    still_well()
    return dom0, still_well


def dealer(dom0, **opts) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(f"ipc://{dom0.runtime / 'control.sock'}")
    return s


def exchange(dom0, *frames: bytes, timeout=5.0) -> dict | None:
    s = dealer(dom0)
    try:
        s.send_multipart(list(frames))
        if not s.poll(timeout * 1000):
            return None
        return json.loads(s.recv())
    finally:
        s.close()


@pytest.mark.parametrize("frames,errno", [
    ((b"{not json",), Errno.INVALID_JSON),
    ((b"\x00\xff" * 50,), Errno.INVALID_JSON),
    ((b"[" * 500_000,), Errno.INVALID_JSON),
    ((b'["status"]',), Errno.BAD_MESSAGE),
    ((b'{"id": 1, "command": "status"}', b"second frame"),  Errno.BAD_MESSAGE),
    ((b'{"id": 1, "command": "shutdown"}',), Errno.UNKNOWN_COMMAND),
    ((b'{"id": 1, "command": "restart", "args": {"domid": "1"}}',), Errno.BAD_ARGUMENTS),
    ((b'{"id": 1, "command": "permissive", "args": {"mode": 1, "bdf": []}}',), Errno.BAD_ARGUMENTS),
    ((b'{"id": 1, "command": "log-level", "args": "DEBUG"}',), Errno.BAD_ARGUMENTS),
])
def test_malformed_requests_get_error_replies(served, frames, errno):
    dom0, still_well = served
    rep = exchange(dom0, *frames)
    assert rep is not None and rep["status"] == "error" and rep["errno"] == errno and rep["reason"], rep
    still_well()
    assert dom0.guest_status(1)["restarts"] == 0


def test_request_size_is_bounded(served):
    dom0, still_well = served
    body = b'{"id": "big", "command": "status"}'
    rep = exchange(dom0, body + b" " * (MAX_REQUEST - len(body)))        # exactly the limit: served
    assert rep is not None and rep["id"] == "big" and rep["status"] == "ok"
    assert exchange(dom0, body + b" " * (MAX_REQUEST - len(body) + 1), timeout=1.0) is None    # dropped
    still_well()


def test_a_100MB_message_is_dropped_and_the_daemon_answers_the_next_client(served):
    dom0, still_well = served
    rss_before = psutil.Process(dom0.daemon.pid).memory_info().rss
    s = dealer(dom0)
    events = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    s.send(b"x" * (100 << 20), copy=False)
    assert events.poll(10_000), "the daemon did not cut the sender off"
    assert parse_monitor_message(events.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED
    assert not s.poll(0)                     # and never answered it
    s.disable_monitor()
    events.close()
    s.close()
    still_well()
    assert psutil.Process(dom0.daemon.pid).memory_info().rss < rss_before + (20 << 20)   # never buffered it
    assert exchange(dom0, b'{"id": 2, "command": "list"}')["result"][0]["domid"] == 1


def test_a_client_that_never_reads(served):
    dom0, still_well = served
    lazy = dealer(dom0, RCVHWM=1, RCVBUF=4096)
    sent = 0
    for i in range(5000):
        try:
            lazy.send(json.dumps({"id": i, "command": "status"}).encode(), zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            break
    assert sent >= 100
    silent = socket.socket(socket.AF_UNIX)                   # connects, never speaks ZMTP, never reads
    silent.connect(str(dom0.runtime / "control.sock"))
    garbage = socket.socket(socket.AF_UNIX)                  # speaks garbage
    garbage.connect(str(dom0.runtime / "control.sock"))
    garbage.sendall(b"\xff" * 4096)
    try:
        for _ in range(5):
            still_well()
        p = ctl(dom0, "--json", "list")
        assert p.returncode == 0 and json.loads(p.stdout)[0]["domid"] == 1
    finally:
        lazy.close()
        silent.close()
        garbage.close()
    still_well()


def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _nobody_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]))


@cache
def _nobody_python() -> str:
    """An interpreter uid nobody may execute (ours may live under a private /root)."""
    for exe in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            p = subprocess.run([exe, "-c", "import zmq, pcibackd.control.cli"], env=_nobody_env(),
                               preexec_fn=_as_nobody, cwd="/", capture_output=True, timeout=30)
        except OSError:
            continue
        if p.returncode == 0:
            return exe
    pytest.skip("no Python interpreter that uid nobody can run with pyzmq")


def ctl_nobody(dom0, *argv) -> subprocess.CompletedProcess:
    """pcibackctl run as uid/gid nobody (65534)."""
    return subprocess.run([_nobody_python(), "-m", "pcibackd.control.cli", "--runtime-dir", str(dom0.runtime),
                           *argv], capture_output=True, text=True, timeout=30, env=_nobody_env(),
                          preexec_fn=_as_nobody, cwd="/")


def test_a_client_of_another_uid_is_refused(served):
    dom0, still_well = served
    p = ctl_nobody(dom0, "status")
    assert p.returncode == 4, (p.stdout, p.stderr)
    assert "permission denied" in p.stderr and "uid 65534" in p.stderr and "run it as root" in p.stderr
    assert p.stdout == ""
    # even with the directories opened up, the socket itself is 0600 and owned by the locked uid
    # (root administrators reach it through CAP_DAC_OVERRIDE, capless uid-0 workers do not)
    modes = {d: os.stat(d).st_mode & 0o777 for d in (dom0.dir, dom0.runtime)}
    try:
        for d in modes:
            os.chmod(d, 0o711)
        p = ctl_nobody(dom0, "--json", "restart", "1")
        assert p.returncode == 4, (p.stdout, p.stderr)
        assert "permission denied on" in p.stderr and f"control.sock (owner uid {LOCKED_UID}, mode 0600)" in p.stderr
        assert json.loads(p.stdout)["error"]["name"] == "ACCESS_DENIED"
    finally:
        for d, mode in modes.items():
            os.chmod(d, mode)
    still_well()
    assert dom0.guest_status(1)["restarts"] == 0


def test_nobody_can_run_pcibackctl_at_all(sim_dom0):
    """The refusal above is the socket's, not a broken install: nobody gets help,
    and 'not running' when there is no daemon."""
    p = ctl_nobody(sim_dom0, "--help")
    assert p.returncode == 0 and "exit codes" in p.stdout
    p = subprocess.run([_nobody_python(), "-m", "pcibackd.control.cli", "--runtime-dir", "/nonexistent", "status"],
                       capture_output=True, text=True, timeout=30, env=_nobody_env(), preexec_fn=_as_nobody, cwd="/")
    assert p.returncode == 3 and "pcibackd is not running" in p.stderr
