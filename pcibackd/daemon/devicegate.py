"""The device gate: the supervisor lends each worker its own devices' files;
and who is speaking on the worker socket (both from the kernel's credentials).

Driver: a thread of the supervisor serving ``<runtime>/devices.sock``
(protocol: :mod:`pcibackd.worker.devicegate`).

Who asks is what the kernel says (SO_PEERCRED's pid), never what the request
claims: the pid must be a live worker of this supervisor (``whose``), and the
function asked for must be listed (``dev-N``) in *that* worker's backend
directory; a ``peek`` may also name the physical function of a listed VF.  A
``claim`` takes the function's flock here, so a function another guest holds
is refused (EBUSY) before any file of it is opened.  Everything else — another
guest's function, dom0's own devices, a pid that is no worker — is refused.

The thread answers one request at a time with a bounded wait per connection
(a worker that connects and stalls delays other workers' opens by at most
:data:`CONN_TIMEOUT`, never the supervisor's loop).  It has its own xenstore
connection and touches the supervisor's state only through ``whose``.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

import zmq
from loguru import logger

from pcibackd.common.ratelimit import worth_logging
from pcibackd.hostpci.records import quarantined
from pcibackd.wire.bdf import BDF
from pcibackd.worker.devicegate import (MAX_REQUEST, decode_request, encode_grant, encode_refusal,
                                        take_claim)
from pcibackd.worker.privileges import lock_away
from pcibackd.xenstore.client import XenStore

GATE_SOCKET = "devices.sock"   # under the runtime directory
CONN_TIMEOUT = 1.0
MAX_LISTED = 256          # dev-N entries read per backend (xen-pciback's limit is lower)
_UCRED = struct.Struct("3i")

# pid -> (domid, backend path) of the live worker with that pid, else None
Whose = Callable[[int], "tuple[int, str] | None"]


class Refused(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end (as the kernel recorded it at connect)."""
    pid, _uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid


def listed_devices(xs: XenStore, backend_path: str) -> set[BDF]:
    """The functions listed in a backend directory (``dev-N``); unparsable entries are skipped."""
    out: set[BDF] = set()
    try:
        untrusted_num = int(xs.read(f"{backend_path}/num_devs") or "0")
    except ValueError:
        return out
    for i in range(min(max(untrusted_num, 0), MAX_LISTED)):
        untrusted_dev = xs.read(f"{backend_path}/dev-{i}")
        if untrusted_dev:
            try:
                out.add(BDF.parse(untrusted_dev))
            except ValueError:
                continue
    return out


class DeviceGate:
    """See the module docstring; :meth:`start` after the runtime directory exists."""

    def __init__(self, path: Path, platform, lock_dir: Path, whose: Whose, xenstored_path: str | None,
                 mode: int = 0o600):
        """``mode`` of the socket: 0600 while workers run as root; workers under their own
        uids need it reachable (the peer's pid, not the mode, is the credential)."""
        self.path, self.platform, self.lock_dir, self.mode = Path(path), platform, Path(lock_dir), mode
        self.state_dir = self.lock_dir.parent / "state"
        self.whose, self.xenstored_path = whose, xenstored_path
        self.refused = 0
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        os.chmod(self.path, self.mode)
        self.sock.listen(socket.SOMAXCONN)     # every worker of a host booting at once
        self._thread = threading.Thread(target=self._serve, name="device-gate", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stop_w < 0:
            return
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(CONN_TIMEOUT * 3)
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.path.unlink(missing_ok=True)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._stop_r = self._stop_w = -1

    # ------------------------------------------------------------ thread --
    def _serve(self) -> None:
        xs = None
        try:
            while True:
                ready = select.poll()
                ready.register(self.sock, select.POLLIN)
                ready.register(self._stop_r, select.POLLIN)
                fds = {fd for fd, _ in ready.poll()}
                if self._stop_r in fds:
                    return
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    continue
                with conn:
                    if xs is None:
                        xs = XenStore(self.xenstored_path)
                    self._answer(conn, xs)
        except Exception:       # the gate must never take the supervisor down
            logger.exception("device gate stopped")
        finally:
            if xs is not None:
                xs.close()

    def _answer(self, conn: socket.socket, xs: XenStore) -> None:
        conn.settimeout(CONN_TIMEOUT)
        lent: dict[str, int] = {}
        try:
            pid = peer_pid(conn)
            untrusted_raw = conn.recv(MAX_REQUEST)
            try:
                op, bdf = decode_request(untrusted_raw)
            except ValueError as exc:
                raise Refused(errno.EINVAL, f"bad request: {exc}") from None
            lent = self.lend(pid, op, bdf, xs)
            socket.send_fds(conn, [encode_grant(list(lent))], list(lent.values()))
        except Refused as exc:
            self.refused += 1
            if worth_logging(self.refused):
                logger.warning("device gate: refused pid {}: {} ({} refusals so far)",
                               locals().get("pid"), exc.reason, self.refused)
            self._try_send(conn, encode_refusal(exc.code, exc.reason))
        except OSError as exc:
            self._try_send(conn, encode_refusal(exc.errno or errno.EIO, exc.strerror or str(exc)))
        finally:
            for fd in lent.values():
                os.close(fd)     # the worker has its own copies now (or none: the claim is gone too)

    @staticmethod
    def _try_send(conn: socket.socket, data: bytes) -> None:
        try:
            conn.send(data)
        except OSError:
            pass

    def lend(self, pid: int, op: str, bdf: BDF, xs: XenStore) -> dict[str, int]:
        """The descriptors worker ``pid`` gets for ``op`` on ``bdf`` (the caller closes its copies)."""
        worker = self.whose(pid)
        if worker is None:
            raise Refused(errno.ESRCH, f"pid {pid} is not a worker of this supervisor")
        domid, backend_path = worker
        listed = listed_devices(xs, backend_path)
        if op == "claim":
            if bdf not in listed:
                raise Refused(errno.EPERM, f"{bdf} is not assigned to domain {domid}")
            # xenstore is writable by any dom0 process: a listing alone never hands out a
            # function dom0 itself uses, nor one whose last reset failed
            if bdf not in self.platform.assignable():
                # ENOENT, as for a function that does not exist: "not an assignable device"
                raise Refused(errno.ENOENT, f"{bdf} is not assignable (no such function, or not stub-bound)")
            if (why := quarantined(self.state_dir, bdf)) is not None:
                raise Refused(errno.EBUSY, f"{bdf} is quarantined: its last reset failed ({why.describe()})")
            claim = take_claim(self.lock_dir, bdf, domid)
            try:
                files = self.platform.open_device_files(bdf, writable=True)
            except BaseException:
                os.close(claim)
                raise
            return {"claim": claim, **files}
        if bdf not in listed and bdf not in self._physfns(listed):
            raise Refused(errno.EPERM, f"{bdf} is not assigned to domain {domid}")
        return self.platform.open_device_files(bdf, writable=False)

    def _physfns(self, listed: set[BDF]) -> set[BDF]:
        out = set()
        for vf in listed:
            try:
                port = self.platform.open_device(vf)
            except OSError:
                continue
            try:
                if port.info.physfn is not None:
                    out.add(port.info.physfn)
            finally:
                getattr(port, "close", lambda: None)()
        return out


def open_gate(runtime: Path, platform, guests: dict, xenstored_path: str | None) -> DeviceGate:
    """The supervisor's started gate at ``<runtime>/devices.sock``; ``guests`` is its live
    domid -> Guest table (read from the gate's thread: each lookup copies its values)."""
    def whose(pid: int) -> tuple[int, str] | None:
        for g in list(guests.values()):
            if g.pid == pid and g.alive:
                return g.domid, g.backend_path
        return None
    # The supervisor's own parts of the runtime directory, out of a worker's reach
    # (a worker is uid 0 without CAP_DAC_OVERRIDE): claims, pid files, the interrupt journal.
    for private in ("claims", "workers", "irq"):
        (runtime / private).mkdir(mode=0o700, exist_ok=True)
        lock_away(runtime / private)
    gate = DeviceGate(runtime / GATE_SOCKET, platform, runtime / "claims", whose, xenstored_path,
                      mode=0o666)     # workers run as uids of their own: the pid is the credential
    gate.start()
    atexit.register(gate.close)        # it outlives the loop: workers stopping may still ask
    return gate


# ------------------------------------------------ the worker socket's senders --
_spoofed = 0
NO_ROUTE = b"\0no-route"       # a routing id no peer has: a send to it is dropped


def zmq_peer(frame) -> tuple[int, int, int] | None:
    """(uid, gid, pid) of the process that sent a frame over ZeroMQ ipc: libzmq records the
    connecting process's SO_PEERCRED as ``Peer-Address`` ``...:uid:gid:pid``."""
    try:
        uid, gid, pid = (int(f) for f in frame.get("Peer-Address").rsplit(":", 3)[1:])
    except (zmq.ZMQError, AttributeError, ValueError, TypeError):
        return None
    return uid, gid, pid


def sent_by(ident: bytes, frame, guest) -> bool:
    """Whether a worker-socket frame naming ``guest`` came from its worker's process (the
    kernel's word, not the message's); if so its connection becomes the guest's route, so
    one worker can neither speak for another nor receive another's commands."""
    global _spoofed
    peer = zmq_peer(frame)
    if peer is not None and peer[2] == guest.pid:
        guest.route = ident
        return True
    _spoofed += 1
    if worth_logging(_spoofed):
        logger.warning("worker socket: a message for domain {} from {} (its worker is pid {}): ignored "
                       "({} so far)", guest.domid, f"pid {peer[2]}" if peer else "an unknown process",
                       guest.pid, _spoofed)
    return False


def route_to(guest) -> bytes:
    """The routing id of ``guest``'s worker link (a dead end until its worker has spoken)."""
    return (guest.route if guest is not None else None) or NO_ROUTE
