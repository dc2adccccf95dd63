"""The control protocol: JSON over ZeroMQ, ROUTER in the daemon, DEALER (or REQ) in clients.

Request  ``{"id": str|int|null, "command": str, "args": {...}}``  (one frame)
Reply    ``{"id": <echoed>, "status": "ok"|"error", "errno": int, "reason": str, "result": ...}``

Requests above :data:`MAX_REQUEST` bytes never reach the daemon: libzmq drops
the connection of the client that sent one (``ZMQ_MAXMSGSIZE``).

Error numbers (circus's numbering where they overlap):
"""

from __future__ import annotations

import enum
import json

MAX_REQUEST = 1 << 20          # bytes; larger requests cost the sender its connection
MAX_REPLY = 16 << 20           # clients drop larger replies (a status of 64 guests is ~100 KiB)
MAX_ID = 128                   # longest request id echoed back
ENDPOINT_NAME = "control.sock"  # in the runtime directory
STATUS_NAME = "status.sock"     # the read-only one, beside it


class Errno(enum.IntEnum):
    OK = 0
    INVALID_JSON = 1         # the frame is not JSON (or nests too deep)
    UNKNOWN_COMMAND = 2
    BAD_ARGUMENTS = 3        # missing, unknown or ill-typed arguments
    COMMAND_FAILED = 4       # the daemon or a worker could not do it
    NOT_FOUND = 5            # no such guest or device
    BAD_MESSAGE = 6          # JSON, but not a request object / wrong framing
    BUSY = 7                 # too many requests waiting for workers
    TIMEOUT = 8              # a worker did not answer in time
    NOT_ALLOWED = 9          # a changing command on the read-only status socket


if __doc__ is not None:              # None under python -OO
    __doc__ += "\n".join(f"    {e.value}  {e.name}" for e in Errno) + "\n"


class BadRequest(Exception):
    """A request that cannot be dispatched; the reply says why."""

    def __init__(self, errno: Errno, reason: str, req_id=None):
        super().__init__(reason)
        self.errno, self.reason, self.req_id = errno, reason, req_id


def request(req_id: str, command: str, args: dict | None = None) -> bytes:
    return json.dumps({"id": req_id, "command": command, "args": args or {}}).encode()


def parse_request(untrusted_raw: bytes) -> tuple[object, str, dict]:
    """(id, command, args) of one request frame, or BadRequest."""
    try:
        untrusted = json.loads(untrusted_raw)
    except (ValueError, RecursionError) as exc:     # RecursionError: "[[[[..." within MAX_REQUEST
        raise BadRequest(Errno.INVALID_JSON, f"invalid JSON: {str(exc)[:80]}") from None
    if not isinstance(untrusted, dict):
        raise BadRequest(Errno.BAD_MESSAGE, "a request is a JSON object {id, command, args}")
    req_id = untrusted.get("id")
    if not (req_id is None or isinstance(req_id, str) and len(req_id) <= MAX_ID
            or isinstance(req_id, int) and not isinstance(req_id, bool) and abs(req_id) < 2 ** 63):
        raise BadRequest(Errno.BAD_MESSAGE, f"id must be a string of at most {MAX_ID} characters or an integer")
    command, args = untrusted.get("command"), untrusted.get("args", {})
    if not isinstance(command, str):
        raise BadRequest(Errno.BAD_MESSAGE, "command must be a string", req_id)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest(Errno.BAD_ARGUMENTS, "args must be an object", req_id)
    return req_id, command, args


class RawJSON(str):
    """A result already encoded as JSON text: :func:`reply` embeds it as it is."""


def reply(req_id, result=None, errno: Errno = Errno.OK, reason: str = "") -> bytes:
    head = {"id": req_id, "status": "ok" if errno == Errno.OK else "error", "errno": int(errno), "reason": reason}
    if isinstance(result, RawJSON):
        return f'{json.dumps(head)[:-1]}, "result": {result}}}'.encode()
    return json.dumps({**head, "result": result}).encode()
