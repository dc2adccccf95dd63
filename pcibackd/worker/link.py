"""The worker's ZeroMQ link to its supervisor: heartbeats with statistics.

A DEALER socket (identity ``dom<domid>``) with a bounded send queue: when the
supervisor is slow or gone, beats are dropped, never queued without limit,
so the op path never blocks on it.
"""

from __future__ import annotations

import json
import os
import time

import zmq

HWM = 16


class Reporter:
    """Sends ``beat`` messages; ``fileno()`` lets the worker's select see commands."""

    def __init__(self, cfg, worker):
        self.worker = worker
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"dom{cfg.domid}".encode())
        self.sock.setsockopt(zmq.SNDHWM, HWM)
        self.sock.setsockopt(zmq.RCVHWM, HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        self.sock.connect(cfg.supervisor_endpoint)
        self.started = time.time()

    def fileno(self) -> int:
        return self.sock.getsockopt(zmq.FD)

    def beat(self, final: bool = False) -> None:
        w = self.worker
        stats = w.dispatcher.stats
        msg = {
            "type": "beat", "pid": os.getpid(), "domid": w.cfg.domid, "final": final, "token": w.cfg.token,
            "xenbus_state": int(w.machine.state), "connected": w.loop.ring is not None,
            "served": dict(stats.served), "errors": dict(stats.errors),
            "spurious": w.loop.spurious, "ignored_inputs": w.driver.ignored,
            "latency_us": w.loop.latency_us(),
            "devices": w.devices.summary(), "started": self.started,
        }
        try:
            self.sock.send(json.dumps(msg).encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass
        self.on_message()

    def on_message(self) -> None:
        """Run supervisor commands (the FD is edge-triggered: read to EAGAIN)."""
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = json.loads(raw)
                handler = self.worker.COMMANDS[msg["cmd"]]
                result, ok = handler(self.worker, msg.get("args") or {}), True
            except Exception as exc:     # a bad command is answered, never fatal
                result, ok = f"{type(exc).__name__}: {exc}", False
                msg = msg if isinstance(msg, dict) else {}
            if msg.get("id") is None:
                continue
            reply = {"type": "reply", "id": msg["id"], "domid": self.worker.cfg.domid, "token": self.worker.cfg.token,
                     "pid": os.getpid(), "ok": ok, "result": result}
            try:
                self.sock.send(json.dumps(reply).encode(), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
