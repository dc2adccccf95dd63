"""Logs for journald: priorities, journal fields, no own timestamp under the journal."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

from loguru import logger

from pcibackd.common import logs


def _journal_env(tmp_path):
    """A file standing in for the journal stream, and JOURNAL_STREAM naming it."""
    path = tmp_path / "stream"
    path.touch()
    st = os.stat(path)
    return path, f"{st.st_dev}:{st.st_ino}"


def _parse(datagram: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            n = struct.unpack("<Q", datagram[nl + 1:nl + 9])[0]
            out[line.decode()] = datagram[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


def test_under_journal_only_when_stream_matches(tmp_path):
    path, stream = _journal_env(tmp_path)
    with open(path, "w") as f:
        assert logs.under_journal({"JOURNAL_STREAM": stream}, f)
        assert not logs.under_journal({"JOURNAL_STREAM": "1:2"}, f)
        assert not logs.under_journal({"JOURNAL_STREAM": "garbage"}, f)
        assert not logs.under_journal({}, f)


def test_prefix_sink_without_journal_socket(tmp_path):
    """stderr is the journal but its socket is not there: <N> prefixes, no timestamp."""
    path, stream = _journal_env(tmp_path)
    code = ("from pcibackd.common import logs; from loguru import logger;"
            f"logs.setup('DEBUG', domid=3, journal_socket={str(tmp_path / 'none')!r});"
            "logger.warning('permissive on {}', '0000:00:05.0'); logger.info('hello'); logger.debug('dbg')")
    with open(path, "w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True,
                       env=dict(os.environ, JOURNAL_STREAM=stream))
    lines = path.read_text().splitlines()
    assert lines[0].startswith("<4>[dom3 pid ") and lines[0].endswith("] permissive on 0000:00:05.0")
    assert lines[1].startswith("<6>[dom3 pid ") and lines[2].startswith("<7>")
    assert not any(ch.isdigit() for ch in lines[1].split("]")[1])      # no timestamp of our own


def test_native_journal_sink_fields(tmp_path, monkeypatch):
    path, stream = _journal_env(tmp_path)
    sock_path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(sock_path)
    journal.settimeout(10)
    monkeypatch.setenv("JOURNAL_STREAM", stream)
    with open(path, "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        try:
            logs.setup("INFO", domid=7, journal_socket=sock_path)
            logger.warning("0000:03:00.0: permissive mode on")
            logger.debug("not sent")
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("failed")
        finally:
            logger.remove()
    first = _parse(journal.recv(65536))
    assert first["PRIORITY"] == "4" and first["DOMID"] == "7" and first["BDF"] == "0000:03:00.0"
    assert first["SYSLOG_IDENTIFIER"] == "pcibackd" and first["MESSAGE"].endswith("permissive mode on")
    assert first["CODE_FUNC"] == "test_native_journal_sink_fields"
    second = _parse(journal.recv(65536))
    assert second["PRIORITY"] == "3" and "RuntimeError: boom" in second["MESSAGE"]
    assert "\n" in second["MESSAGE"]           # multi-line values use the length-prefixed form
    journal.close()


def test_plain_sink_has_timestamp_and_level(tmp_path):
    code = "from pcibackd.common import logs; from loguru import logger; logs.setup('INFO'); logger.error('x')"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stderr
    assert err.count("-") >= 2 and "ERROR" in err and "[supervisor] x" in err


def test_kv():
    assert logs.kv({"domid": 3, "bdf": "0000:00:05.0"}) == "domid=3 bdf=0000:00:05.0"
