"""The xenstore gate process: a worker reaches xenstored only through it.

Driver: the gate process (:func:`run_gate`) and the supervisor's handle on
it (:class:`XsGate`).  The forwarding and the policy are
:mod:`pcibackd.xenstore.gate` and :mod:`pcibackd.xenstore.policy`.

A worker gets no xenstored connection of its own (xenstored would treat it
as dom0: any node, any permission).  Before spawning it, the supervisor makes
a socketpair, hands one end to the gate over the gate's control socket
(SCM_RIGHTS, with the guest's domid) and the other end to the worker; the
gate pairs it with a xenstored connection and forwards only what that
guest's worker may do.

Where it runs, and why a process of its own: a gate inside the supervisor
would hold one more descriptor per worker there, and, worse, would take
every worker's xenstore connection down when the supervisor crashes, while
"a killed supervisor loses nothing" must hold (the workers keep serving and
are adopted by the next supervisor).  The gate therefore runs beside the
workers: started from the fork server, it survives a supervisor crash like
they do, and the next supervisor finds it at its control socket
(``<runtime>/xsgate/control.sock``, in a directory only the supervisor
reaches) and goes on using it; the supervisor holds no descriptor per worker
for it (each end is closed once handed over).  If the gate dies, its workers
see their xenstore connection end and exit; the supervisor restarts them,
and the first of them starts a new gate.  SIGINT stops the gate after the
workers; SIGTERM hands the workers over (daemon/handover.py) and tells the
gate to linger: it serves them on and exits with the last of them unless a
successor pairs again.  A gate left without workers otherwise (orphans that
exited, no guest) exits after :data:`IDLE_EXIT`.

The gate needs no capability (it connects to xenstored's socket as uid 0 and
accepts on a listener the supervisor made): it drops them all once started.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from pyxs.connection import UnixSocketConnection

from pcibackd.common import logs, proctitle
from pcibackd.daemon.spawner import disown
from pcibackd.worker import privileges
from pcibackd.worker.privileges import lock_away
from pcibackd.xenstore.gate import Gate

GATE_DIR = "xsgate"            # under the runtime directory, locked away from workers
CONTROL = "control.sock"
CONTROL_TIMEOUT = 2.0          # s: one control exchange (the gate serves one at a time)
START_TIMEOUT = 10.0           # s: a freshly spawned gate answering its first request
MAX_MESSAGE = 512
ACCEPTS_PER_WAKE = 32
IDLE_EXIT = 60.0               # s without any worker: exit (orphaned, or no guest; the next pairing restarts it)
PRIORITY_BOOST = 5             # nice steps above the workers (about 3x a worker's CPU weight)
BACKLOG = 1024                 # pairings queued for the gate (a bring-up of many guests)
MAX_DOMID = 0x7FEF
_UCRED = struct.Struct("3i")


@dataclass
class GateConfig:
    """What the gate process needs; crosses the fork server (the listener as a descriptor)."""

    listener: socket.socket
    xenstored_path: str | None = None
    log_level: str = "INFO"


# ------------------------------------------------------------ the gate process --
class _Control:
    """The gate's control listener: ``pair`` (a worker's connection, with its domid), ``ping``,
    ``linger`` (exit with the last worker), ``stop``."""

    def __init__(self, listener: socket.socket, gate: Gate) -> None:
        self.listener, self.gate = listener, gate
        self.listener.setblocking(False)
        self.stopping = False
        self.idle_exit = IDLE_EXIT      # s with no worker before the gate exits

    def on_ready(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):      # a bring-up queues many pairings; traffic still gets turns
            try:
                conn, _ = self.listener.accept()
            except OSError:          # BlockingIOError: none left
                return
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            try:
                conn.settimeout(CONTROL_TIMEOUT)
                _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                untrusted_raw, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE, 1)
                if uid != os.getuid():
                    raise OSError(errno.EPERM, f"uid {uid} is not the supervisor's")
                answer = self._handle(json.loads(untrusted_raw), fds)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                answer = {"ok": False, "errno": getattr(exc, "errno", None) or errno.EINVAL, "reason": str(exc)[:200]}
            finally:
                for fd in fds:
                    os.close(fd)      # the gate keeps its own socket object (a dup) of a paired end
            try:
                conn.send(json.dumps(answer).encode())
            except OSError:
                pass

    def _handle(self, untrusted: dict, fds: list[int]) -> dict:
        op = untrusted.get("op")
        if op == "linger":      # the supervisor handed its workers over: leave with the last of them
            self.idle_exit = 0.0
            return {"ok": True, "pid": os.getpid(), "links": self.gate.links}
        if op in ("stop", "ping"):
            self.stopping = self.stopping or op == "stop"
            return {"ok": True, "pid": os.getpid(), "links": self.gate.links}
        domid = untrusted.get("domid")
        if op != "pair" or type(domid) is not int or not 0 < domid <= MAX_DOMID or len(fds) != 1:
            raise ValueError("a request is {\"op\": \"pair\", \"domid\": N} with one descriptor, \"ping\" or \"stop\"")
        sock = socket.socket(fileno=os.dup(fds[0]))
        if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_UNIX:
            sock.close()
            raise ValueError("not a unix stream socket")
        try:
            self.gate.add(domid, sock)
        except BaseException:
            sock.close()
            raise
        self.idle_exit = IDLE_EXIT       # a supervisor is pairing again
        return {"ok": True, "pid": os.getpid()}


def run_gate(cfg: GateConfig) -> None:
    """Process entry point (target of the spawner): serve until told to stop or SIGTERM."""
    logs.setup(cfg.log_level, role="xenstore gate")
    proctitle.set_title("xenstore gate")
    upstream = UnixSocketConnection(cfg.xenstored_path).path

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(upstream)
        except BaseException:
            sock.close()
            raise
        return sock

    gate = Gate(connect)
    control = _Control(cfg.listener, gate)
    gate.watch(cfg.listener.fileno(), control.on_ready)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGTERM, lambda *_: setattr(control, "stopping", True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a terminal's ^C is the supervisor's to handle
    gate.watch(rfd, lambda: os.read(rfd, 64))
    try:
        # One process forwards every worker's traffic, two hops per round trip: under CPU
        # contention it gets more weight than a worker, or every bring-up waits on its turns.
        os.setpriority(os.PRIO_PROCESS, 0, max(-20, os.getpriority(os.PRIO_PROCESS, 0) - PRIORITY_BOOST))
    except OSError:
        pass         # not allowed (no CAP_SYS_NICE): the same weight as a worker
    try:
        privileges.drop()
    except OSError as exc:
        logger.warning("xenstore gate keeps its privileges: {}", exc)
    logger.info("xenstore gate serving (xenstored at {})", upstream)
    code = 0
    idle_since = time.monotonic()
    try:
        while not control.stopping:
            gate.poll_once(None if gate.links else int(control.idle_exit * 1000) + 1)
            if gate.links:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= control.idle_exit:
                logger.info("xenstore gate: no worker for {:.0f} s: exiting", control.idle_exit)
                break
    except Exception:
        logger.exception("xenstore gate crashed")
        code = 1
    gate.close()
    logger.info("xenstore gate stopped ({} forwarded, {} refused)", gate.forwarded, gate.refused)
    os._exit(code)


# ------------------------------------------------------- the supervisor's side --
class XsGate:
    """The supervisor's handle: :meth:`pair` a worker's connection, :meth:`stop` the gate."""

    def __init__(self, runtime: Path, spawner, xenstored_path: str | None, log_level: str = "INFO") -> None:
        self.dir = Path(runtime) / GATE_DIR
        self.path = self.dir / CONTROL
        self.spawner, self.xenstored_path, self.log_level = spawner, xenstored_path, log_level
        self.proc = None          # the gate this supervisor started (None: found running, or none yet)

    def pair(self, domid: int) -> socket.socket:
        """A connected socket for ``domid``'s worker, served by the gate (started if none runs);
        OSError when no gate can be reached.  The supervisor does not wait for the gate's
        answer (bring-up is not serialized behind the gate's traffic): if the gate cannot
        serve it (xenstored unreachable), it closes the pair, the worker's boot fails and
        is retried with backoff."""
        worker_end, gate_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            request = {"op": "pair", "domid": domid}
            try:
                self._send(request, [gate_end.fileno()])
            except (ConnectionRefusedError, FileNotFoundError):
                self._start()
                self._send(request, [gate_end.fileno()], timeout=START_TIMEOUT)
        except BaseException:
            worker_end.close()
            raise
        finally:
            gate_end.close()      # the gate has its copy: the supervisor keeps nothing per worker
        return worker_end

    def ping(self) -> dict | None:
        """The running gate's ``{"pid": ..., "links": ...}``; None when none answers."""
        try:
            return self._ask({"op": "ping"}, [])
        except OSError:
            return None

    def stop(self, timeout: float = CONTROL_TIMEOUT) -> None:
        """Stop the gate (after the workers: theirs connections end with it)."""
        try:
            self._ask({"op": "stop"}, [])
        except OSError:
            pass        # none running
        if self.proc is not None:
            self.proc.join(timeout)
            self.proc = None

    def close(self, stop: bool) -> None:
        """At the supervisor's exit: stop the gate, or (``stop`` False: workers handed over)
        leave it running so they keep their xenstore connections (a successor finds it at its
        control socket); told to linger, it exits with the last of them unless a successor pairs."""
        if stop:
            self.stop()
            return
        try:
            self._ask({"op": "linger"}, [])
        except OSError:
            pass        # none running
        if self.proc is not None:
            disown(self.proc)
            self.proc = None

    def _send(self, request: dict, fds: list[int], timeout: float = CONTROL_TIMEOUT) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            socket.send_fds(s, [json.dumps(request).encode()], fds)

    def _ask(self, request: dict, fds: list[int], timeout: float = CONTROL_TIMEOUT) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            socket.send_fds(s, [json.dumps(request).encode()], fds)
            raw = s.recv(MAX_MESSAGE)
        try:
            answer = json.loads(raw)
            if answer.get("ok") is True:
                return answer
            code, reason = int(answer.get("errno") or errno.EPROTO), str(answer.get("reason"))
        except (ValueError, TypeError, AttributeError):
            code, reason = errno.EPROTO, f"malformed answer {raw[:80]!r}"
        raise OSError(code, f"xenstore gate: {reason}")

    def _start(self) -> None:
        """A new gate on a fresh listener (made here, so requests wait in its backlog, never race
        its start-up)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_away(self.dir)
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(BACKLOG)
            if self.proc is not None:
                self.proc.join(0)
            self.proc = self.spawner.spawn(run_gate, GateConfig(listener, self.xenstored_path, self.log_level),
                                           name="pcibackd-xsgate")
        finally:
            listener.close()
        logger.info("xenstore gate started: pid {}", self.proc.pid)
