"""The control protocol: JSON over a ZeroMQ ROUTER (daemon) / DEALER (client).

Request  ``{"id": str, "command": str, "args": {...}}``
Reply    ``{"id": str, "status": "ok"|"error", "errno": int, "reason": str, "result": ...}``

Error numbers (named like circus's):
"""

from __future__ import annotations

import enum
import json

MAX_MESSAGE = 1 << 20          # requests above this are dropped by libzmq


class Errno(enum.IntEnum):
    OK = 0
    INVALID_JSON = 1
    UNKNOWN_COMMAND = 2
    BAD_ARGUMENTS = 3
    COMMAND_FAILED = 4
    NOT_FOUND = 5


__doc__ += "\n".join(f"    {e.value}  {e.name}" for e in Errno) + "\n"


def reply(req_id, result=None, errno: Errno = Errno.OK, reason: str = "") -> bytes:
    return json.dumps({"id": req_id, "status": "ok" if errno == Errno.OK else "error",
                       "errno": int(errno), "reason": reason, "result": result}).encode()
