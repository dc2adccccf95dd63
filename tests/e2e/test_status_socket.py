"""The control socket is root's alone; the status socket lets a monitoring group
read status and nothing else (a process under another uid tries both)."""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket

import pytest

from pcibackd.control.client import call
from pcibackd.control.protocol import Errno
from simdom0.dom0 import SimDom0

NOBODY = pwd.getpwnam("nobody").pw_uid
MONITOR = grp.getgrnam("nogroup")          # an existing group stands for pcibackd-monitor


def as_other_user(body, gid: int = MONITOR.gr_gid) -> int:
    """Run ``body`` in a child under uid nobody (group ``gid``); its return value is the exit code."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os._exit(body())
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def daemon():
    with SimDom0(config={"status_group": MONITOR.gr_name}) as dom0:
        dom0.start(daemon=False)
        for d in (dom0.dir, dom0.sim_dir):      # the test's scratch directories are private
            os.chmod(d, 0o711)
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        dom0.start_daemon()
        yield dom0


def test_another_uid_cannot_reach_the_control_socket(daemon):
    def body() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(daemon.runtime / "control.sock"))
            except PermissionError:
                return 10
        return 11
    assert as_other_user(body) == 10


def test_the_status_socket_reads_but_refuses_changes(daemon):
    endpoint = f"ipc://{daemon.runtime / 'status.sock'}"

    def body() -> int:
        rep = call(None, "status", endpoint=endpoint)
        if rep["status"] != "ok" or [g["domid"] for g in rep["result"]["guests"]] != [1]:
            return 11
        for cmd, args in (("restart", {"domid": 1}), ("permissive", {"domid": 1, "on": True}),
                          ("log-level", {"level": "DEBUG"})):
            rep = call(None, cmd, args, endpoint=endpoint)
            if rep["errno"] != Errno.NOT_ALLOWED:
                return 12
        return 10
    assert as_other_user(body) == 10
    # root keeps every command on the control socket
    assert call(daemon.runtime, "log-level", {"level": "INFO"})["status"] == "ok"


def test_outside_the_group_the_status_socket_is_closed(daemon):
    def body() -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(daemon.runtime / "status.sock"))
            except PermissionError:
                return 10
        return 11
    assert as_other_user(body, gid=12345) == 10


def test_root_on_the_status_socket_is_root(daemon):
    rep = call(None, "log-level", {"level": "INFO"}, endpoint=f"ipc://{daemon.runtime / 'status.sock'}")
    assert rep["status"] == "ok"
