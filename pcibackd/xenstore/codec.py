"""The xenstore wire protocol as bytes: packet framing, payload checks, replies.

A packet is an ``xsd_sockmsg`` header (type, req_id, tx_id, len; host byte
order) and at most :data:`PAYLOAD_MAX` bytes of payload.  Paths, tokens and
permissions are checked here before they are sent, so xenstored never sees
what it would reject anyway.  The operation numbers are pyxs's (:data:`Op`).
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Iterator

from pyxs._internal import Op

__all__ = ["Op", "HEADER", "PAYLOAD_MAX", "Packet", "pack", "PacketReader", "check_path", "check_watch_path",
           "check_token", "check_perms", "decode", "reply_error"]

HEADER = struct.Struct("=IIII")  # xsd_sockmsg: type, req_id, tx_id, len
PAYLOAD_MAX = 4096

_PATH_RE = re.compile(r"[A-Za-z0-9_@/-]+")
_SPECIAL_WATCHES = frozenset({"@introduceDomain", "@releaseDomain"})
_PERM_RE = re.compile(r"[wrbn][0-9]+")

Packet = tuple[int, int, int, bytes]    # (op, req_id, tx_id, payload)


def pack(op: int, rq_id: int, tx_id: int, payload: bytes) -> bytes:
    """One request packet; ValueError when the payload is too long for xenstored."""
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(op, rq_id, tx_id, len(payload)) + payload


class PacketReader:
    """Cuts the byte stream from xenstored into packets."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[Packet]:
        """The packets ``chunk`` completes, one at a time (the rest waits for more bytes).

        OSError(EPROTO) at a length over :data:`PAYLOAD_MAX`: the stream is out
        of step, and nothing after it can be trusted."""
        self._buf += chunk
        while len(self._buf) >= HEADER.size:
            op, rq_id, tx_id, size = HEADER.unpack_from(self._buf)
            if size > PAYLOAD_MAX:
                raise OSError(errno.EPROTO, f"xenstore packet of {size} bytes")
            end = HEADER.size + size
            if len(self._buf) < end:
                return
            payload, self._buf = self._buf[HEADER.size:end], self._buf[end:]
            yield op, rq_id, tx_id, payload


def check_path(path: str) -> bytes:
    """Encode a path, rejecting what xenstored would reject anyway."""
    limit = 3072 if path.startswith("/") else 2048
    if (
        not _PATH_RE.fullmatch(path)
        or len(path) > limit
        or "//" in path
        or (len(path) > 1 and path.endswith("/"))
    ):
        raise ValueError(f"invalid xenstore path {path!r}")
    return path.encode("ascii")


def check_watch_path(path: str) -> bytes:
    """A path to watch: a node path or one of the special ``@`` watches."""
    if path.startswith("@") and path not in _SPECIAL_WATCHES:
        raise ValueError(f"invalid special watch path {path!r}")
    return check_path(path)


def check_token(token: str) -> bytes:
    """A watch token: non-empty, no NUL."""
    if not token or "\0" in token:
        raise ValueError(f"invalid watch token {token!r}")
    return token.encode("ascii")


def check_perms(perms: list[str]) -> bytes:
    """Permission strings (``n0``, ``r5`` ...) as the NUL-terminated list SET_PERMS takes."""
    if not perms or not all(_PERM_RE.fullmatch(p) for p in perms):
        raise ValueError(f"invalid xenstore permissions {perms!r}")
    return b"".join(p.encode() + b"\0" for p in perms)


def decode(raw: bytes) -> str:
    """Text of a value or name read from xenstore."""
    # Guest-written bytes need not be UTF-8; surrogateescape keeps them
    # round-trippable instead of raising inside the caller.
    return raw.decode("utf-8", "surrogateescape")


def reply_error(code_name: bytes, path: str | None) -> OSError:
    """The OSError for an ERROR reply (``"ENOENT\\0"`` ...); EIO for a name we do not know."""
    name = code_name.rstrip(b"\0").decode("ascii", "replace")
    code = getattr(errno, name, None) if name.startswith("E") else None
    if not isinstance(code, int):
        return OSError(errno.EIO, f"xenstore error {name!r}", path)
    return OSError(code, os.strerror(code), path)
