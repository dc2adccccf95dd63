"""Small builders the unit and end-to-end tests share."""

from __future__ import annotations

import os
import socket
import threading
import traceback
import time

from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import backend_path
from pcibackd.wire.pciif import Err
from pcibackd.xenstore.client import XenStore
from pcibackd.xenstore.toolstack import Toolstack
from waiting import wait_until


def op_bytes(cmd: int, devfn: int = 0, value: int = 0, entries=()) -> bytes:
    """A private copy of an op as the worker takes it from the shared page (entry numbers in ``entries``)."""
    buf = bytearray(pciif.PCI_OP.size)
    pciif.OP_HEADER.pack_into(buf, 0, cmd, 0, 0, 0, devfn, 0, 0, value, 0)
    for i, e in enumerate(entries):
        pciif.MSIX_ENTRY.pack_into(buf, pciif.OP_MSIX_ENTRIES + 4 * i, 0, e)
    return bytes(buf)


def detach_in_background(xenstored_socket: str, domid: int, bdf: str) -> tuple[threading.Thread, threading.Event]:
    """Start the toolstack's hot-unplug of ``bdf`` from ``domid`` on its own connection; the event is set when
    the detach returned (or failed)."""
    done = threading.Event()

    def unplug():
        xs = XenStore(xenstored_socket)
        try:
            Toolstack(xs).detach(domid, BDF.parse(bdf))
        finally:
            xs.close()
            done.set()
    t = threading.Thread(target=unplug)
    t.start()
    return t, done


class Traffic:
    """A guest's config reads (its vendor/device word at 0000:00:00.0) in a loop on a thread of
    its own, with the backend's xenbus state read after each: what the guest sees while the
    daemon or its service is acted on.  A context manager; ``expect`` is the word's value."""

    def __init__(self, front, expect: int):
        self.front, self.expect = front, expect
        self.ops = self.bad = 0
        self.slowest = 0.0
        self.states: set[str | None] = set()
        self.front_states: set[int | None] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        be = backend_path(self.front.domid)
        while not self._stop.is_set():
            t = time.monotonic()
            result = self.front.conf_read(BDF(0, 0, 0, 0), 0, 2)
            self.slowest = max(self.slowest, time.monotonic() - t)
            self.ops += 1
            self.bad += result != (Err.success, self.expect)
            self.states.add(self.front.xs.read(f"{be}/state"))
            self.front_states.add(self.front.state())
            self._stop.wait(0.005)      # a guest's pace, not a spin: the daemon restarting needs the CPUs

    def __enter__(self) -> "Traffic":
        self._thread.start()
        wait_until(lambda: self.ops >= 3, what="the guest's first ops")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.front.op_timeout + 10)

    def wait_more(self, n: int = 20) -> None:
        """Until ``n`` more ops went through (the service is serving again, not only up)."""
        target = self.ops + n
        wait_until(lambda: self.ops >= target, timeout=60, what=f"{n} more ops of dom{self.front.domid}")


class Refusals:
    """Attempts that must be refused with EPERM/EACCES; ``unexpected`` lists each that was not
    (what it was, and the other error when it failed otherwise)."""

    def __init__(self):
        self.unexpected: list[str] = []

    def must_fail(self, what: str, action) -> None:
        try:
            action()
        except PermissionError:
            return
        except OSError as exc:
            self.unexpected.append(f"{what}: {exc}")
            return
        self.unexpected.append(what)


def connect_unix(path, kind=socket.SOCK_STREAM) -> None:
    """Connect to the unix socket at ``path`` and close again."""
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.connect(str(path))


def in_child(attempts) -> str:
    """Run ``attempts()`` (which returns the refusals that did not happen) in a forked child, so a
    privilege drop or filter it applies stays there; what it returned, or its traceback."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.write(wfd, "\n".join(attempts()).encode())
            os._exit(0)
        except BaseException:
            os.write(wfd, traceback.format_exc().encode())
            os._exit(1)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        failures = f.read()
    _, status = os.waitpid(pid, 0)
    return failures if os.waitstatus_to_exitcode(status) == 0 else failures or f"child exited {status}"
