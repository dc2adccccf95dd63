"""The daemon side of the control socket (``ipc://<runtime>/control.sock``).

The runtime directory is 0700 and the socket 0600, so only root (the owner)
can connect; every request gets an answer, errors included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import zmq
from loguru import logger

from .commands import COMMANDS, CommandError
from .protocol import MAX_MESSAGE, Errno, reply


class ControlServer:
    def __init__(self, zctx, path: Path, supervisor):
        self.sup = supervisor
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
            try:
                self.sock.send_multipart([ident, self.handle(raw)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass      # a client that does not read is dropped, never waited for

    def handle(self, raw: bytes) -> bytes:
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
            return reply(req_id, entry[0](self.sup, args))
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
