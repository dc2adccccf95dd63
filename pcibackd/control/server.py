"""The daemon side of the control socket (``ipc://<runtime>/control.sock``).

The runtime directory is 0700 and the socket 0600, so only root (the owner)
can connect; every request gets an answer, errors included.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq
from loguru import logger

from .commands import COMMANDS, CommandError
from .protocol import MAX_MESSAGE, Errno, reply


@dataclass
class Pending:
    """A reply that needs answers from workers: ``sends`` go out now, ``finish``
    turns the replies (by domid; missing = no answer in time) into the result."""

    sends: list[tuple[int, str, dict]]
    finish: Callable[[dict[int, dict]], object]
    timeout: float = 2.0
    replies: dict[int, dict] = field(default_factory=dict)
    deadline: float = 0.0
    client: tuple = ()


class ControlServer:
    def __init__(self, zctx, path: Path, supervisor):
        self.sup = supervisor
        self.pending: dict[str, Pending] = {}
        self.path = Path(path)
        self.sock = zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.sock.setsockopt(zmq.SNDHWM, 64)
        self.sock.setsockopt(zmq.SNDTIMEO, 0)
        old = os.umask(0o177)
        try:
            self.sock.bind(f"ipc://{self.path}")
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def handle_ready(self) -> None:
        for _ in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            ident, raw = frames
            answer = self.handle(raw)
            if isinstance(answer, tuple):        # (request id, Pending)
                self._start_pending(ident, *answer)
            else:
                self._send(ident, answer)

    def _send(self, ident: bytes, data: bytes) -> None:
        try:
            self.sock.send_multipart([ident, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass      # a client that does not read is dropped, never waited for

    def _start_pending(self, ident: bytes, req_id, pending: Pending) -> None:
        key = uuid.uuid4().hex
        pending.client, pending.deadline = (ident, req_id), time.monotonic() + pending.timeout
        for domid, cmd, args in pending.sends:
            if not self.sup.send_worker(domid, cmd, args, req_id=key):
                pending.replies[domid] = {"ok": False, "result": "worker not reachable"}
        self.pending[key] = pending
        self.flush_pending()

    def worker_reply(self, domid: int, msg: dict) -> None:
        pending = self.pending.get(msg.get("id"))
        if pending is not None:
            pending.replies[domid] = msg

    def flush_pending(self) -> None:
        """Answer requests whose workers all replied or whose time is up."""
        now = time.monotonic()
        for key, p in list(self.pending.items()):
            if len(p.replies) < len({d for d, _, _ in p.sends}) and now < p.deadline:
                continue
            del self.pending[key]
            ident, req_id = p.client
            try:
                data = reply(req_id, p.finish(p.replies))
            except CommandError as exc:
                data = reply(req_id, errno=exc.errno, reason=exc.reason)
            self._send(ident, data)

    def handle(self, raw: bytes):
        """One request -> reply bytes, or (request id, Pending) for worker round trips."""
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return reply(None, errno=Errno.INVALID_JSON, reason=f"invalid JSON: {exc}")
        req_id = req.get("id")
        name, args = req.get("command"), req.get("args") or {}
        entry = COMMANDS.get(name) if isinstance(name, str) else None
        if entry is None:
            return reply(req_id, errno=Errno.UNKNOWN_COMMAND, reason=f"unknown command {str(name)[:40]!r}")
        if not isinstance(args, dict):
            return reply(req_id, errno=Errno.BAD_ARGUMENTS, reason="args must be an object")
        try:
            result = entry[0](self.sup, args)
            if isinstance(result, Pending):
                return req_id, result
            return reply(req_id, result)
        except CommandError as exc:
            return reply(req_id, errno=exc.errno, reason=exc.reason)
        except Exception as exc:       # a command bug must not take the daemon down
            logger.exception("control command {} failed", name)
            return reply(req_id, errno=Errno.COMMAND_FAILED, reason=str(exc))

    def close(self) -> None:
        self.sock.close(0)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
