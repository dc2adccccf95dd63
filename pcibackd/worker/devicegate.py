"""How a worker gets its devices' files: from the supervisor, as descriptors.

A worker never opens a host function's files itself.  It asks the
supervisor's device gate (``<runtime>/devices.sock``, a SOCK_SEQPACKET unix
socket) and receives open descriptors (SCM_RIGHTS).  The gate knows the asker
from the kernel (SO_PEERCRED: the pid of one of its workers), and lends only
the functions listed in that worker's own backend directory:

* ``claim BDF``: the function's claim (an flock on ``<runtime>/claims/<bdf>.lock``
  taken by the gate, held by the worker's descriptor, released by the kernel
  when the worker dies) and its files opened for serving (config, reset);
* ``peek BDF``: its config read-only, for facts (SR-IOV, bridges above it); a
  VF's physical function may be peeked at too.

One request per connection: JSON ``{"op": ..., "bdf": ...}``; the answer is
JSON ``{"ok": true, "names": [...]}`` with one descriptor per name, or
``{"ok": false, "errno": N, "reason": ...}``.

A gate that does not answer (its supervisor died: connection refused, or the
socket is gone) or does not know the asker yet (ESRCH: a successor that has
not adopted it) is asked again, with backoff, for up to ``patience`` seconds
(the worker's orphan_grace): a worker booting while its supervisor restarts
waits for the successor instead of giving its guest's devices up.

:class:`LocalOpener` opens the files in-process instead (a worker started
without a supervisor: unit tests, a standalone run as root).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from loguru import logger

from pcibackd.hostpci.port import HostPort
from pcibackd.wire.bdf import BDF

MAX_REQUEST = 256
MAX_ANSWER = 1024
MAX_FDS = 8
GATE_TIMEOUT = 5.0        # seconds for one answer (the gate serves one request at a time)
RETRY_UNKNOWN = 2.0       # a fresh worker may ask before the supervisor has recorded its pid
RETRY_FIRST, RETRY_MAX = 0.05, 1.0     # backoff between two tries (seconds)
UNANSWERED = (ConnectionRefusedError, FileNotFoundError)   # no supervisor behind the gate's path
OPS = ("claim", "peek")


def encode_request(op: str, bdf: BDF) -> bytes:
    return json.dumps({"op": op, "bdf": str(bdf)}).encode()


def decode_request(untrusted_raw: bytes) -> tuple[str, BDF]:
    """(op, bdf) of a request; ValueError for anything else."""
    untrusted = json.loads(untrusted_raw[:MAX_REQUEST])
    if type(untrusted) is not dict or untrusted.get("op") not in OPS or type(untrusted.get("bdf")) is not str:
        raise ValueError("a request is {\"op\": \"claim\"|\"peek\", \"bdf\": BDF}")
    return untrusted["op"], BDF.parse(untrusted["bdf"])


def encode_refusal(code: int, reason: str) -> bytes:
    return json.dumps({"ok": False, "errno": code, "reason": reason[:400]}).encode()


def encode_grant(names: list[str]) -> bytes:
    return json.dumps({"ok": True, "names": names}).encode()


def ask_gate(path: str | Path, op: str, bdf: BDF, timeout: float = GATE_TIMEOUT,
             patience: float = 0.0) -> dict[str, int]:
    """The descriptors the gate lends for ``op`` on ``bdf`` (the caller owns them).

    A refusal is an OSError with the gate's errno (ENOENT: FileNotFoundError); an
    unanswered gate is retried for ``patience`` seconds (see the module docstring)."""
    start = time.monotonic()
    deadline = start + RETRY_UNKNOWN
    pause = RETRY_FIRST
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
                s.settimeout(timeout)
                _connect(s, str(path), time.monotonic() + timeout)
                s.send(encode_request(op, bdf))
                raw, fds, _flags, _addr = socket.recv_fds(s, MAX_ANSWER, MAX_FDS)
        except UNANSWERED as exc:
            if time.monotonic() + pause > start + patience:
                raise
            if pause == RETRY_FIRST:
                logger.warning("device gate not answering ({}): waiting up to {:.0f} s for a supervisor",
                               exc.strerror or exc, patience)
            deadline = start + patience      # a successor may answer ESRCH until it has adopted us
            time.sleep(pause)
            pause = min(RETRY_MAX, pause * 2)
            continue
        try:
            answer = json.loads(raw)
            if answer.get("ok") is True and len(answer["names"]) == len(fds):
                return dict(zip(answer["names"], fds))
        except (ValueError, TypeError, KeyError, AttributeError):
            answer = {"errno": errno.EPROTO, "reason": "malformed answer from the device gate"}
        for fd in fds:
            os.close(fd)
        code = answer.get("errno") if type(answer.get("errno")) is int else errno.EPROTO
        if code == errno.ESRCH and time.monotonic() < deadline:
            time.sleep(RETRY_FIRST)   # the supervisor has not recorded our pid yet
            continue
        raise OSError(code, f"device gate: {answer.get('reason', 'refused')}")


def _connect(s: socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting while the gate's backlog is full: a unix socket with a timeout
    fails at once with EAGAIN then (hundreds of workers starting together), not a refusal."""
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _close(files: dict[str, int]) -> None:
    for fd in files.values():
        os.close(fd)


class GateOpener:
    """Devices through the supervisor's gate (see module docstring)."""

    def __init__(self, platform, path: str | Path, patience: float = 0.0):
        """``patience``: how long an unanswered gate is asked again (the worker's orphan_grace)."""
        self.platform, self.path, self.patience = platform, Path(path), patience

    def claim(self, host: BDF) -> tuple[int, HostPort]:
        """(claim descriptor, port): the function is ours until the descriptor is closed."""
        files = ask_gate(self.path, "claim", host, patience=self.patience)
        claim_fd = files.pop("claim", None)
        try:
            if claim_fd is None:
                raise OSError(errno.EPROTO, "device gate: no claim in the answer")
            return claim_fd, self.platform.device_from_files(host, files)
        except BaseException:
            _close(files)
            if claim_fd is not None:
                os.close(claim_fd)
            raise

    def peek(self, host: BDF) -> HostPort:
        """The function's config, read-only."""
        files = ask_gate(self.path, "peek", host, patience=self.patience)
        try:
            return self.platform.device_from_files(host, files, writable=False)
        except BaseException:
            _close(files)
            raise


def take_claim(lock_dir: Path, host: BDF, domid: int) -> int:
    """The claim descriptor of ``host`` (an flock; EBUSY if another holder has it)."""
    fd = os.open(lock_dir / f"{host}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EBUSY, f"{host} is already assigned to another guest") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{domid}\n".encode())
    return fd


class LocalOpener:
    """Devices opened in-process (no supervisor; needs the privileges to open them)."""

    def __init__(self, platform, lock_dir: Path, domid: int):
        self.platform, self.lock_dir, self.domid = platform, Path(lock_dir), domid

    def claim(self, host: BDF) -> tuple[int, HostPort]:
        fd = take_claim(self.lock_dir, host, self.domid)
        try:
            return fd, self.platform.open_device(host)
        except BaseException:
            os.close(fd)
            raise

    def peek(self, host: BDF) -> HostPort:
        return self.platform.open_device(host)
