"""Client side of the control socket (pcibackctl, the demo, tests, benchmarks).

:func:`call` sends one request and returns the reply dict; every way of not
getting one raises a :class:`DaemonUnreachable` subclass that says why.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path

import zmq
from zmq.utils.monitor import parse_monitor_message

from pcibackd.control.curve import client_keys
from pcibackd.control.protocol import ENDPOINT_NAME, MAX_REPLY, request


class DaemonUnreachable(RuntimeError):
    """No reply; ``exit_code`` is pcibackctl's."""

    exit_code = 3
    name = "UNREACHABLE"


class NotRunning(DaemonUnreachable):
    exit_code = 3
    name = "NOT_RUNNING"


class AccessDenied(DaemonUnreachable):
    exit_code = 4
    name = "ACCESS_DENIED"


class NoAnswer(DaemonUnreachable):
    exit_code = 5
    name = "NO_ANSWER"


def ipc_endpoint(runtime_dir: str | Path) -> str:
    return f"ipc://{Path(runtime_dir) / ENDPOINT_NAME}"


def _check_ipc(path: Path) -> None:
    """Tell 'not running' from 'not allowed' before ZeroMQ retries silently."""
    who = f"pcibackctl runs as uid {os.geteuid()}"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotRunning(f"pcibackd is not running: no control socket at {path}") from None
    except PermissionError:
        raise AccessDenied(f"permission denied: {path.parent} is private to the daemon's user "
                           f"(root); {who}: run it as root") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NotRunning(f"{path} is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(str(path))
        except PermissionError:
            raise AccessDenied(f"permission denied on {path} (owner uid {st.st_uid}, mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); {who}: run it as root") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise NotRunning(f"pcibackd is not running: nothing listens on {path} (stale socket)") from None
            raise NotRunning(f"cannot connect to {path}: {exc.strerror}") from None


def call(runtime_dir: str | Path | None, command: str, args: dict | None = None, timeout: float = 5.0,
         endpoint: str | None = None, curve_dir: str | Path | None = None) -> dict:
    """Send one request to ``ipc://<runtime_dir>/control.sock`` (or ``endpoint``;
    TCP needs ``curve_dir``) and return the reply ``{id, status, errno, reason, result}``."""
    if endpoint is None:
        endpoint = ipc_endpoint(runtime_dir)
    if endpoint.startswith("ipc://"):
        _check_ipc(Path(endpoint[len("ipc://"):]))
    elif curve_dir is None:
        raise AccessDenied(f"{endpoint}: the daemon accepts TCP clients with CURVE keys only (--curve-dir)")
    keys = None
    if curve_dir is not None:
        keys = client_keys(curve_dir)          # CurveError when missing or unreadable
    return _Call(endpoint, keys).run(command, args or {}, timeout)


class _Call:
    def __init__(self, endpoint: str, keys: tuple[bytes, bytes, bytes] | None):
        self.endpoint = endpoint
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)
        if keys is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = keys
        # connection events tell "refused" and "key not allowed" from a slow daemon
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.seen: set[int] = set()
        self.curve = keys is not None

    def run(self, command: str, args: dict, timeout: float) -> dict:
        try:
            self.sock.connect(self.endpoint)
            req_id = uuid.uuid4().hex
            self.sock.send(request(req_id, command, args))
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            end = time.monotonic() + timeout
            while (left := end - time.monotonic()) > 0:
                ready = dict(poller.poll(left * 1000))
                if self.monitor in ready:
                    self._on_event(parse_monitor_message(self.monitor.recv_multipart()))
                if self.sock in ready:
                    rep = self._decode(self.sock.recv())
                    if rep.get("id") == req_id:
                        return rep
            raise NoAnswer(f"no answer from pcibackd at {self.endpoint} within {timeout:g} s (busy or hung?)")
        finally:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.sock.close(0)

    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        self.seen.add(kind)
        if kind == zmq.EVENT_CONNECT_RETRIED and zmq.EVENT_CONNECTED not in self.seen:
            raise NotRunning(f"pcibackd is not running: {self.endpoint} refused the connection")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise AccessDenied(f"{self.endpoint} refused this client's CURVE key (not in the daemon's "
                               "control_curve_dir/clients)")
        if kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) or (
                kind == zmq.EVENT_DISCONNECTED and zmq.EVENT_HANDSHAKE_SUCCEEDED not in self.seen):
            if not self.curve:
                raise NotRunning(f"{self.endpoint} closed the connection at once (pcibackd stopping?)")
            raise AccessDenied(f"{self.endpoint} closed the connection during the CURVE handshake "
                               "(is server.key in --curve-dir the daemon's?)")
        if kind == zmq.EVENT_DISCONNECTED:
            raise NoAnswer(f"{self.endpoint} closed the connection before answering")

    @staticmethod
    def _decode(raw: bytes) -> dict:
        try:
            rep = json.loads(raw)
        except ValueError:
            return {}
        return rep if isinstance(rep, dict) else {}
