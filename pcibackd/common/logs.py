"""Logging setup (loguru): one call per process, after any fork.

Three sinks, chosen by where stderr goes:

* the journal (``$JOURNAL_STREAM`` names stderr, as under systemd) and its
  native socket answers: one datagram per record with ``PRIORITY=``,
  ``DOMID=``, ``BDF=`` (the first host address in the message) and the code
  location, so ``journalctl -p warning -u pcibackd`` and
  ``journalctl DOMID=3`` work;
* the journal without its socket: ``<N>`` sd-daemon priority prefixes on
  stderr, no timestamp of our own (the journal keeps one);
* anything else (a terminal, a file): a timestamp, the level and who logs.

Every line names its process (``supervisor`` or ``dom3 pid 1234``).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
import traceback

from loguru import _better_exceptions, logger

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "pcibackd"
# syslog priorities (sd-daemon(3)) of loguru's levels
PRIORITY = {"TRACE": 7, "DEBUG": 7, "INFO": 6, "SUCCESS": 5, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
BDF_RE = re.compile(r"\b[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]\b")

_PLAIN = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} [{extra[who]}] {message}"
_PREFIXED = "<{extra[priority]}>[{extra[who]}] {message}"


def _cache_library_dirs() -> None:
    """loguru works out the library directories (sysconfig, every install scheme) again for
    each sink it adds: 5-15 ms of every worker's start.  They do not change, so they are
    worked out once, here (the fork server imports this module: its workers inherit them)."""
    formatter = getattr(_better_exceptions, "ExceptionFormatter", None)
    compute = getattr(formatter, "_get_lib_dirs", None)
    if compute is None:
        return
    dirs = compute()
    formatter._get_lib_dirs = staticmethod(lambda: list(dirs))


_cache_library_dirs()


def under_journal(environ=os.environ, stream=None) -> bool:
    """Whether ``stream`` (stderr) is the journal: ``$JOURNAL_STREAM`` is its ``dev:inode``."""
    untrusted = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = untrusted.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def journal_fields(record: dict) -> dict[str, str]:
    """The native journal fields of one loguru record."""
    text = f"[{record['extra']['who']}] {record['message']}"
    if record["exception"] is not None:
        exc = record["exception"]
        text += "\n" + "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    fields = {"MESSAGE": text, "PRIORITY": str(PRIORITY.get(record["level"].name, 6)),
              "SYSLOG_IDENTIFIER": IDENTIFIER, "CODE_FILE": record["file"].path,
              "CODE_LINE": str(record["line"]), "CODE_FUNC": record["function"]}
    if record["extra"].get("domid") is not None:
        fields["DOMID"] = str(record["extra"]["domid"])
    bdf = BDF_RE.search(record["message"])
    if bdf:
        fields["BDF"] = bdf.group(0)
    return fields


def encode_journal(fields: dict[str, str]) -> bytes:
    """The journal's native datagram: ``KEY=value`` lines, length-prefixed where a value has a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSink:
    """A loguru sink writing native journal datagrams; a record the socket
    refuses (too large, journald restarting) goes to stderr with its ``<N>`` prefix."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)         # OSError: no journal here

    def __call__(self, message) -> None:
        record = message.record
        try:
            self.sock.send(encode_journal(journal_fields(record)))
        except OSError:
            prio = PRIORITY.get(record["level"].name, 6)
            sys.stderr.write(f"<{prio}>[{record['extra']['who']}] {record['message']}\n")
            sys.stderr.flush()


def _priority(record: dict) -> None:
    record["extra"]["priority"] = PRIORITY.get(record["level"].name, 6)


def setup(level: str = "INFO", domid: int | None = None, role: str | None = None,
          journal_socket: str = JOURNAL_SOCKET) -> None:
    """Replace loguru's default sink with ours (see the module docstring; no enqueue thread)."""
    who = role or ("supervisor" if domid is None else f"dom{domid} pid {os.getpid()}")
    logger.remove()
    logger.configure(extra={"who": who, "domid": domid, "priority": 6}, patcher=_priority)
    common = dict(level=level.upper(), backtrace=False, diagnose=False, enqueue=False)
    if under_journal():
        try:
            logger.add(JournalSink(journal_socket), **common)
            return
        except OSError:
            pass
        logger.add(sys.stderr, format=_PREFIXED, colorize=False, **common)
        return
    logger.add(sys.stderr, format=_PLAIN, colorize=sys.stderr.isatty(), **common)


def kv(mapping: dict) -> str:
    """``{"domid": 3, "bdf": "..."}`` -> ``domid=3 bdf=...`` for log lines (never a dict repr)."""
    return " ".join(f"{k}={v}" for k, v in mapping.items())
