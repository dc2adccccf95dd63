"""A worker asking the device gate while the gate's listen backlog is full (every
worker of a host starting at once) waits for room instead of failing its export."""

from __future__ import annotations

import os
import socket
import threading

from pcibackd.wire.bdf import BDF
from pcibackd.worker import devicegate
from pcibackd.worker.devicegate import ask_gate, encode_grant


def test_a_full_backlog_is_waited_out(tmp_path, monkeypatch):
    path = str(tmp_path / "devices.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:          # fill the backlog until the kernel refuses at once (EAGAIN)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        queued.append(s)
    refused_once = threading.Event()
    real_sleep = devicegate.time.sleep

    def sleep(seconds):
        refused_once.set()
        real_sleep(seconds)
    monkeypatch.setattr(devicegate.time, "sleep", sleep)
    result = {}

    def ask():
        try:
            result["files"] = ask_gate(path, "peek", BDF.parse("0000:00:05.0"), timeout=30)
        except Exception as exc:
            result["error"] = exc
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        assert refused_once.wait(30), f"the asker did not wait for room: {result}"
        for s in queued:                 # room in the backlog: the asker gets in
            listener.accept()[0].close()
            s.close()
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(256).startswith(b"{")
            r, w = os.pipe()
            socket.send_fds(conn, [encode_grant(["config"])], [r])
            os.close(r)
            os.close(w)
    finally:
        asker.join(30)
        listener.close()
    assert "error" not in result, result
    assert list(result["files"]) == ["config"]
    os.close(result["files"]["config"])
