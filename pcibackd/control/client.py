"""Client side of the control socket (used by pcibackctl, the demo and tests)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import zmq


class DaemonUnreachable(RuntimeError):
    pass


def call(runtime_dir: str | Path, command: str, args: dict | None = None, timeout: float = 5.0) -> dict:
    """Send one request and wait for its reply (raises DaemonUnreachable)."""
    path = Path(runtime_dir) / "control.sock"
    if not path.exists():
        raise DaemonUnreachable(f"no control socket at {path}: is pcibackd running?")
    if not os.access(path, os.R_OK | os.W_OK):
        raise DaemonUnreachable(f"permission denied on {path}: pcibackctl must run as root")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{path}")
        req_id = uuid.uuid4().hex
        sock.send(json.dumps({"id": req_id, "command": command, "args": args or {}}).encode())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while poller.poll(timeout * 1000):
            rep = json.loads(sock.recv())
            if rep.get("id") == req_id:
                return rep
        raise DaemonUnreachable(f"no answer from pcibackd within {timeout} s ({path})")
    finally:
        sock.close(0)
