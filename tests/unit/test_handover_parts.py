"""The handover's pieces without a daemon: the grace a worker accepts, the setting,
and a worker asking a device gate that no supervisor serves yet."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from pcibackd.daemon.config import DaemonConfig
from pcibackd.wire.bdf import BDF
from pcibackd.worker import devicegate
from pcibackd.worker.main import handover_grace

BDF0 = BDF.parse("0000:00:05.0")


def test_handover_grace_is_clamped_to_orphan_grace_and_checked():
    assert handover_grace(10, 60.0) == 10.0
    assert handover_grace(100.0, 60.0) == 60.0       # an orphan's limit holds anyway
    assert handover_grace(-5, 60.0) == 0.0
    for bad in ("10", None, True, float("nan"), [1]):
        with pytest.raises(ValueError):
            handover_grace(bad, 60.0)


def test_handover_grace_defaults_and_zero_is_allowed(tmp_path):
    assert DaemonConfig.load(None).handover_grace == 10.0
    path = tmp_path / "c.toml"
    path.write_text("handover_grace = 0\n")
    assert DaemonConfig.load(path).handover_grace == 0.0


def _refusing_socket(path) -> socket.socket:
    """A gate path with nothing listening (a dead supervisor's socket): connect is refused."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    return s


def test_an_unanswered_gate_fails_at_once_without_patience(tmp_path):
    path = tmp_path / "devices.sock"
    with _refusing_socket(path):
        with pytest.raises(ConnectionRefusedError):
            devicegate.ask_gate(path, "peek", BDF0)
    with pytest.raises(FileNotFoundError):
        devicegate.ask_gate(tmp_path / "none.sock", "peek", BDF0)


def test_an_unanswered_gate_is_asked_again_until_a_successor_answers(tmp_path, monkeypatch):
    path = tmp_path / "devices.sock"
    dead = _refusing_socket(path)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pauses = []

    def pause(seconds):           # in the third pause the successor's gate replaces the dead one
        pauses.append(seconds)
        if len(pauses) == 3:
            dead.close()
            path.unlink()
            live.bind(str(path))
            live.listen(1)
            threading.Thread(target=_serve_once, args=(live,), daemon=True).start()
    monkeypatch.setattr(devicegate.time, "sleep", pause)
    files = devicegate.ask_gate(path, "peek", BDF0, patience=60.0)
    live.close()
    assert list(files) == ["config"]
    for fd in files.values():
        devicegate.os.close(fd)
    assert pauses == [devicegate.RETRY_FIRST, 2 * devicegate.RETRY_FIRST, 4 * devicegate.RETRY_FIRST]


def _serve_once(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        request = json.loads(conn.recv(256))
        assert request == {"op": "peek", "bdf": str(BDF0)}
        r, w = devicegate.os.pipe()
        devicegate.os.close(w)
        socket.send_fds(conn, [devicegate.encode_grant(["config"])], [r])
        devicegate.os.close(r)


def test_patience_runs_out_with_the_last_error(tmp_path, monkeypatch):
    path = tmp_path / "devices.sock"
    clock = [0.0]
    monkeypatch.setattr(devicegate.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(devicegate.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    with _refusing_socket(path):
        with pytest.raises(ConnectionRefusedError):
            devicegate.ask_gate(path, "claim", BDF0, patience=5.0)
    assert 4.0 <= clock[0] <= 5.0          # asked again for the whole patience, no longer
