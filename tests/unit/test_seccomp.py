"""The worker's seccomp filter, applied in a forked child (the filter cannot be lifted)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

import pytest

from pcibackd.worker import privileges, seccomp


def _in_filtered_child(body) -> int:
    """Run ``body`` in a child under no_new_privs + the filter; its exit code (body's return)."""
    pid = os.fork()
    if pid == 0:
        try:
            privileges.set_no_new_privs()
            seccomp.install()
            os._exit(body())
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _tries_exec() -> int:
    try:
        os.execv("/bin/true", ["true"])
    except PermissionError:
        return 10
    return 11


def test_a_filtered_worker_cannot_exec():
    assert _in_filtered_child(_tries_exec) == 10


def test_threads_started_before_the_filter_are_filtered_too():
    pid = os.fork()
    if pid == 0:
        try:
            go, denied = threading.Event(), []

            def later():
                go.wait()
                try:
                    os.execv("/bin/true", ["true"])
                except PermissionError:
                    denied.append(True)

            thread = threading.Thread(target=later)
            thread.start()                       # running before the filter, as ZeroMQ's I/O thread is
            privileges.set_no_new_privs()
            seccomp.install()
            go.set()
            thread.join()
            os._exit(10 if denied else 11)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10


def test_what_the_op_loop_needs_still_works():
    def body() -> int:
        a, b = socket.socketpair()
        a.send(b"x")
        assert b.recv(1) == b"x"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET):
            pass
        t = threading.Thread(target=lambda: None)      # clone with CLONE_THREAD
        t.start()
        t.join()
        with open("/proc/self/status") as f:
            f.read()
        return 10
    assert _in_filtered_child(body) == 10


@pytest.mark.parametrize("what, call, want", [
    ("inet socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), errno.EAFNOSUPPORT),
    ("fork", os.fork, errno.EPERM),
    ("unshare", lambda: _libc_call("unshare", 0x00020000), errno.EPERM),         # CLONE_NEWNS
    ("setns", lambda: _libc_call("setns", os.open("/proc/self/ns/mnt", os.O_RDONLY), 0), errno.EPERM),
    ("mount", lambda: _libc_call("mount", b"none", b"/mnt", b"tmpfs", 0, None), errno.EPERM),
])
def test_denied_calls_fail_with_their_errno(what, call, want):
    def body() -> int:
        try:
            call()
        except OSError as exc:
            return 10 if exc.errno == want else 12
        return 11
    assert _in_filtered_child(body) == 10, what


def test_the_filter_is_shown_in_proc():
    assert _in_filtered_child(lambda: 10 if seccomp.mode() == 2 else 11) == 10


def test_unknown_architectures_are_refused():
    with pytest.raises(NotImplementedError):
        seccomp.build("mips")
    for machine in seccomp.ARCHES:
        assert seccomp.build(machine)[-1][3] == 0x7FFF0000       # ends in allow
