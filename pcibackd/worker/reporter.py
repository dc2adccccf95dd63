"""The worker's ZeroMQ link to its supervisor.

A DEALER socket (no fixed identity: the supervisor routes to the connection
its pid spoke on) with a bounded send queue: when the
supervisor is slow or gone, beats are dropped, never queued without limit,
so the op path never blocks on it.

A broker question is the one thing the worker waits for (:meth:`Reporter.ask`),
bounded by :data:`IRQ_TIMEOUT`, well under pcifront's 2 s op timeout; commands
that arrive meanwhile are run afterwards, answers to questions given up on are
dropped.

A monitor on the socket tells the worker when its connection is made again
(a new supervisor bound the endpoint, after a crash or a handover): the worker
reports at once instead of at its next keepalive (up to heartbeat_interval),
so the successor knows it RUNNING and acknowledges it.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque

import zmq

from pcibackd.irq.messages import Answer, WorkerRequest, refused
from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import (MAX_FRAME, DeviceReport, IrqReply, Latency, ServiceTimes, WorkerCommand,
                                  WorkerIrqRequest, WorkerReply, WorkerReport, parse_supervisor_message)

HWM = 16
IRQ_TIMEOUT = 1.6        # seconds a broker question may take: pcifront gives up on the op after 2 s, and
                         # a 3-vector MSI-X map took ~0.8 s on the TCG lane


class Reporter:
    """Sends reports and replies; ``fileno()`` lets the worker's poll see commands."""

    def __init__(self, cfg, worker):
        self.worker = worker
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(cfg.supervisor_endpoint)
        self.reconnected()       # arms the monitor's FD, which signals nothing until EVENTS was read once
        self.started = time.time()
        self._asked = 0
        # commands that came during ask(), run by on_message (a flood beyond this is dropped)
        self.deferred: deque[WorkerCommand | Exception] = deque(maxlen=256)
        self.drain = False           # ask() read the socket: its edge-triggered FD may stay quiet
        self.last_sent = 0.0         # monotonic time of the last report
        self._frame: bytes | None = None     # the last report, serialized

    def fileno(self) -> int:
        return self.sock.getsockopt(zmq.FD)

    def monitor_fileno(self) -> int:
        return self.monitor.getsockopt(zmq.FD)

    def reconnected(self) -> bool:
        """Whether the link was (re)connected since the last call (reads the monitor to EAGAIN:
        its FD is edge-triggered).  The events are only counted: the fact is enough."""
        seen = False
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            seen = True
        return seen

    def report(self, final: bool = False) -> WorkerReport:
        """This worker's heartbeat, from its live objects."""
        w = self.worker
        stats = w.dispatcher.stats
        latency = w.loop.latency_us()
        return WorkerReport(
            domid=w.cfg.domid, pid=os.getpid(), token=w.cfg.token, final=final,
            xenbus_state=int(w.machine.state), connected=w.loop.ring is not None,
            served=dict(stats.served), op_errors={op: dict(c) for op, c in stats.errors.items()},
            op_misses={op: dict(c) for op, c in stats.misses.items()},
            spurious=w.loop.spurious, ignored_inputs=w.driver.ignored,
            latency_us=Latency(latency["p50"], latency["p99"], latency["n"]) if latency else None,
            service=ServiceTimes(stats.service.bounds_us, tuple(stats.service.counts), stats.service.sum_ns / 1000),
            cpu_seconds=round(sum(os.times()[:2]), 3),
            devices=tuple(DeviceReport(BDF.parse(d["bdf"]), BDF.parse(d["vbdf"]), d["permissive"],
                                       d["denied_writes"]) for d in w.devices.summary()),
            started=self.started)

    def beat(self, final: bool = False, fresh: bool = True) -> None:
        """Send a report: at a change, as the rare keepalive, or the final one.
        ``fresh=False`` (nothing changed since the last): resend that one as it was."""
        if fresh or final or self._frame is None:
            self._frame = self.report(final).to_json()
        self._send(self._frame)
        self.last_sent = time.monotonic()
        self.on_message()

    def on_message(self) -> bool:
        """Run supervisor commands (the FD is edge-triggered: read to EAGAIN).
        True if one could have changed what the report says (anything but an ack)."""
        self.drain = False
        changed = False
        while self.deferred:
            changed |= self._run(self.deferred.popleft())
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = self._parse(raw)
            if not isinstance(msg, IrqReply):     # a late answer to a question given up on
                changed |= self._run(msg)
        return changed

    @staticmethod
    def _parse(raw: bytes) -> WorkerCommand | IrqReply | Exception:
        try:
            return parse_supervisor_message(raw)
        except Exception as exc:     # a bad frame is answered if it can be, never fatal
            return exc

    def _run(self, msg: WorkerCommand | Exception) -> bool:
        req_id = None
        try:
            if isinstance(msg, Exception):
                raise msg
            if msg.cmd == "ack" and msg.id is None:
                self.worker.COMMANDS["ack"](self.worker, msg.args)
                return False
            req_id = msg.id
            handler = self.worker.COMMANDS[msg.cmd]
            result, ok = handler(self.worker, msg.args), True
        except Exception as exc:     # a bad command is answered, never fatal
            result, ok = f"{type(exc).__name__}: {exc}", False
        if req_id is not None:
            cfg = self.worker.cfg
            self._send(WorkerReply(cfg.domid, os.getpid(), cfg.token, req_id, ok, result).to_json())
        return True

    def ask(self, request: WorkerRequest, timeout: float = IRQ_TIMEOUT) -> Answer:
        """Send a broker question and wait for its answer (at most ``timeout`` s).

        Never raises: a full link or no answer in time is an answer too (EAGAIN,
        ETIMEDOUT), which the caller's client turns into a refusal.
        """
        self._asked += 1
        self.drain = True
        req_id = f"irq-{self._asked}"
        cfg = self.worker.cfg
        frame = WorkerIrqRequest(cfg.domid, os.getpid(), cfg.token, req_id, request).to_json()
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return refused(errno.EAGAIN, "link_busy", "the supervisor link is full")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            msg = self._parse(raw)
            if isinstance(msg, IrqReply):
                if msg.id == req_id:
                    return msg.answer
                continue
            self.deferred.append(msg)        # a command (or a bad frame) for on_message
        return refused(errno.ETIMEDOUT, "timeout", f"no broker answer in {timeout} s")

    def tell(self, request: WorkerRequest) -> None:
        """Send a broker request without waiting (its answer is dropped when it comes)."""
        self._asked += 1
        cfg = self.worker.cfg
        self._send(WorkerIrqRequest(cfg.domid, os.getpid(), cfg.token, f"irq-{self._asked}", request).to_json())

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()
