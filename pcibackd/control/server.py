"""The daemon side of the control socket.

``ipc://<runtime>/control.sock``: the runtime directory is root's and writable
by nobody else (0711: workers, under their own uids, reach their own sockets in
it) and the socket is 0600, so only root gets in.  ``<runtime>/status.sock``
(0660, group ``status_group``) is the same ROUTER's read-only door: a request
from a uid other than the daemon's (the kernel's word: libzmq records the ipc
peer's SO_PEERCRED) may run only the commands in :data:`READ_ONLY`.  With ``control_tcp`` configured the
same ROUTER also listens on TCP, CURVE only, for the client keys allowed in
``control_curve_dir`` (libzmq takes security options per bind, so the ipc
endpoint stays plain).

Every request gets exactly one reply, errors included; requests above
:data:`MAX_REQUEST` cost the sender its connection (libzmq), and a client that
does not read loses its replies, never blocking the daemon.
"""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import time
import uuid
from pathlib import Path

import zmq
from loguru import logger

from pcibackd.control import curve
from pcibackd.control.commands import COMMANDS, Answer, CommandError, Pending
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import MAX_REQUEST, STATUS_NAME, BadRequest, Errno, parse_request, reply, request
from pcibackd.control.statusview import StatusView
from pcibackd.worker.link import WorkerReply
from pcibackd.worker.privileges import lock_away

BATCH = 64               # requests per wake-up: the supervisor loop has other work
MAX_PENDING = 64         # requests waiting for workers at once
SNDHWM = 64              # replies queued per client; further ones are dropped
HANDSHAKE_MS = 5000      # a connection that never completes the ZMTP handshake is closed
READ_ONLY = frozenset({"status", "list", "devices", "metrics"})   # what a non-root peer may ask (not logged)
# reads that are not logged either: `pcibackctl pci-attach` asks pci-list every few hundred ms while it waits
UNLOGGED = READ_ONLY | {"pci-list", "assignable-list"}


class ControlSetupError(RuntimeError):
    pass


def _check_private_dir(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o066:
        raise ControlSetupError(f"{path} must be owned by uid {os.geteuid()} with mode 0700 or 0711 "
                                f"(is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")


def peer_is_admin(frame: zmq.Frame) -> bool:
    """Whether a request comes from an administrator: a CURVE client with an allowed key
    (ZAP User-Id), or an ipc peer running as the daemon's uid (``Peer-Address``
    ``...:uid:gid:pid`` from SO_PEERCRED).  Anything else is not."""
    try:
        if frame.get("User-Id"):
            return True
    except zmq.ZMQError:
        pass
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return False
    parts = address.rsplit(":", 3)
    return len(parts) == 4 and parts[0] == "localhost" and parts[1] == str(os.geteuid())


def _bind_ipc(sock: zmq.Socket, path: Path, mode: int, gid: int = -1) -> None:
    old = os.umask(0o177)
    try:
        sock.bind(f"ipc://{path}")
    finally:
        os.umask(old)
    if gid >= 0:
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def _refuse_if_live(path: Path) -> None:
    """A socket someone still answers on belongs to another daemon: do not steal it."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(str(path))
        except OSError:
            return        # stale, left by a daemon that died; libzmq replaces it
    raise ControlSetupError(f"another pcibackd is serving {path}")


class ControlServer:
    """Made by ``pcibackd run`` and handed to the supervisor (the daemon's
    ``ControlEndpoint``), which polls :attr:`sock` and calls :meth:`handle_ready`
    and :meth:`flush_pending` from its loop.  Commands act on ``face``.

    ``tcp``: also listen there, CURVE only, for the client keys in ``curve_dir``.
    ``metrics``: an HTTP metrics listener (control/exposition.py); its scrapes are
    read-only requests on this socket's ``inproc`` door, answered by the loop."""

    def __init__(self, zctx: zmq.Context, path: Path, face: DaemonFace, tcp: str | None = None,
                 curve_dir: str | Path | None = None, metrics=None, status_group: str | None = None):
        self.face = face
        self.zctx = zctx
        self.view = StatusView.of(face)
        self.metrics = metrics
        self.path = Path(path)
        self.status_path: Path | None = None
        self.pending: dict[str, Pending] = {}
        self.auth = None
        _check_private_dir(self.path.parent)
        _refuse_if_live(self.path)
        self.sock = zctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, MAX_REQUEST), (zmq.SNDHWM, SNDHWM),
                           (zmq.RCVHWM, BATCH), (zmq.HANDSHAKE_IVL, HANDSHAKE_MS)):
            self.sock.setsockopt(opt, value)
        _bind_ipc(self.sock, self.path, 0o600)
        lock_away(self.path)            # root administrators only: not a worker (uid 0, no capabilities)
        self.endpoints = {"ipc": str(self.path), "tcp": None}
        self.inproc = f"inproc://pcibackd-control-{id(self):x}"     # this process's threads only: the metrics
        self.sock.bind(self.inproc)                                 # listener (before CURVE: plain)
        self._scrapes: zmq.Socket | None = None                     # the listener thread's client socket
        self._scraped = 0
        if metrics is not None:
            metrics.attach(self._ask_metrics)
        if status_group:
            self._bind_status(status_group)
        if tcp:
            self._bind_curve(zctx, tcp, curve_dir)

    def _bind_status(self, group: str) -> None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            logger.warning("no group {!r}: the read-only status socket is not opened", group)
            return
        self.status_path = self.path.with_name(STATUS_NAME)
        _refuse_if_live(self.status_path)
        _bind_ipc(self.sock, self.status_path, 0o660, gid)
        self.endpoints["status"] = str(self.status_path)

    def _bind_curve(self, zctx, endpoint: str, curve_dir: str | Path | None) -> None:
        try:
            if curve_dir is None:
                raise curve.CurveError("no directory of CURVE keys")
            public, secret = curve.server_keys(curve_dir)
            self.auth = curve.start_authenticator(zctx, curve_dir)
        except curve.CurveError as exc:
            self.close()
            raise ControlSetupError(f"control_tcp {endpoint}: {exc}") from None
        self.sock.curve_server = True
        self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
        self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ControlSetupError(f"control_tcp {endpoint}: {exc}") from None
        self.endpoints["tcp"] = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        logger.info("control also on {} (CURVE; allowed client keys in {})", self.endpoints["tcp"],
                    curve.clients_dir(curve_dir))

    # ------------------------------------------------------------ input --
    def handle_ready(self) -> None:
        """Answer up to BATCH requests (the socket stays readable for the rest)."""
        for _ in range(BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            admin = peer_is_admin(frames[-1])
            frames = [f.bytes for f in frames]
            envelope, body = frames[:1], frames[1:]
            if len(body) >= 2 and body[0] == b"":       # a REQ client: keep its delimiter
                envelope, body = envelope + [b""], body[1:]
            if len(body) != 1:
                self._send(envelope, reply(None, errno=Errno.BAD_MESSAGE,
                                           reason="a request is exactly one frame of JSON"))
                continue
            answer = self.dispatch(body[0], admin)
            if isinstance(answer, tuple):
                self._start_pending(envelope, *answer)
            else:
                self._send(envelope, answer)

    def dispatch(self, raw: bytes, admin: bool = True):
        """One request frame -> reply bytes, or (request id, Pending) for worker round trips;
        not ``admin``: only the :data:`READ_ONLY` commands."""
        req_id = None
        try:
            req_id, name, untrusted_args = parse_request(raw)
            cmd = COMMANDS.get(name)
            if cmd is None:
                raise BadRequest(Errno.UNKNOWN_COMMAND, f"unknown command {name[:40]!r}", req_id)
            if not admin and cmd.name not in READ_ONLY:
                raise CommandError(Errno.NOT_ALLOWED, f"{cmd.name} needs the control socket (root); "
                                                      f"this one serves only {', '.join(sorted(READ_ONLY))}")
            args = cmd.check(untrusted_args)
            if cmd.name not in UNLOGGED:
                logger.info("control: {} {}", cmd.name, " ".join(f"{k}={v}" for k, v in args.items()))
            result = cmd.execute(self.face, args)
            if isinstance(result, Pending):
                if len(self.pending) >= MAX_PENDING:
                    raise CommandError(Errno.BUSY, f"{len(self.pending)} requests already wait for workers")
                return req_id, result
            return self._encode(req_id, result)
        except BadRequest as exc:
            logger.debug("control: bad request: {}", exc.reason)
            return reply(exc.req_id, errno=exc.errno, reason=exc.reason)
        except CommandError as exc:
            return reply(req_id, errno=exc.errno, reason=exc.reason)
        except Exception as exc:       # a command bug must not take the daemon down
            logger.exception("control command failed")
            return reply(req_id, errno=Errno.COMMAND_FAILED, reason=f"internal error: {type(exc).__name__}: {exc}")

    @staticmethod
    def _encode(req_id, result) -> bytes:
        try:
            return reply(req_id, result)
        except (TypeError, ValueError) as exc:
            logger.error("control: result not JSON: {}", exc)
            return reply(req_id, errno=Errno.COMMAND_FAILED, reason="internal error: result not JSON")

    def _send(self, envelope: list[bytes], data: bytes) -> None:
        try:
            self.sock.send_multipart(envelope + [data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass      # gone, or not reading: dropped, never waited for

    # -------------------------------------------------- worker round trips --
    def _start_pending(self, envelope: list[bytes], req_id, pending: Pending) -> None:
        key = uuid.uuid4().hex
        pending.client = (envelope, req_id)
        pending.start()
        for domid, cmd, args in pending.sends:
            if not self.face.send_worker(domid, cmd, args, req_id=key):
                pending.replies[domid] = Answer(False, "worker not reachable")
        self.pending[key] = pending
        self.flush_pending()

    def worker_reply(self, reply: WorkerReply) -> None:
        """A worker's (authenticated) answer: counted if its request still waits for it."""
        pending = self.pending.get(reply.id)
        if pending is not None and any(d == reply.domid for d, _, _ in pending.sends):
            pending.replies[reply.domid] = Answer(reply.ok, reply.result)

    def flush_pending(self) -> None:
        """Answer requests whose workers all replied or whose time is up (and run a sample
        pass if one is due)."""
        now = time.monotonic()
        self.view.tick(now)
        for key, p in list(self.pending.items()):
            if not p.done(now):
                continue
            del self.pending[key]
            envelope, req_id = p.client
            try:
                data = self._encode(req_id, p.finish(p.replies))
            except CommandError as exc:
                data = reply(req_id, errno=exc.errno, reason=exc.reason)
            except Exception as exc:
                logger.exception("control: finishing a worker round trip failed")
                data = reply(req_id, errno=Errno.COMMAND_FAILED, reason=f"internal error: {exc}")
            self._send(envelope, data)

    def next_deadline(self) -> float | None:
        """Monotonic time the next pending request times out or a sample pass is due (for the
        loop's poll timeout); None: nothing to do until a request comes."""
        due = min((p.deadline for p in self.pending.values()), default=None)
        sample = self.view.due(time.monotonic())
        if sample is not None:
            due = sample if due is None else min(due, sample)
        return due

    def _ask_metrics(self, timeout: float) -> dict | None:
        """From the metrics listener's thread: the ``metrics`` command's data, asked on the
        inproc door like any read-only client (its own socket, used by that thread only);
        None if the loop does not answer within ``timeout`` seconds."""
        if self._scrapes is None:
            self._scrapes = self.zctx.socket(zmq.DEALER)
            self._scrapes.setsockopt(zmq.LINGER, 0)
            self._scrapes.connect(self.inproc)
        self._scraped += 1
        want = f"scrape-{self._scraped}"
        deadline = time.monotonic() + timeout
        try:
            self._scrapes.send(request(want, "metrics"))
            while (left := deadline - time.monotonic()) > 0 and self._scrapes.poll(max(1, int(left * 1000))):
                answer = json.loads(self._scrapes.recv())
                if answer.get("id") == want:         # (not the late answer to a scrape given up on)
                    return answer["result"] if answer.get("status") == "ok" else None
        except (zmq.ZMQError, ValueError, KeyError):
            pass
        return None

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()            # its thread has ended: its socket can be closed here
            self.metrics = None
        if self._scrapes is not None:
            self._scrapes.close(0)
            self._scrapes = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.sock.close(0)
        for path in (self.path, self.status_path):
            if path is not None:
                path.unlink(missing_ok=True)
