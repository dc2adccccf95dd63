"""`pcibackd run` under systemd conventions: READY=1 on a local NOTIFY_SOCKET
once the xenstore watch is up, STOPPING=1 on SIGTERM, exit 0."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from simdom0.dom0 import SimDom0
from pcibackd.daemon import systemd


def test_notify_socket_protocol(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    with SimDom0(env={"NOTIFY_SOCKET": path}) as dom0:
        dom0.start(daemon=False)
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        dom0.start_daemon()
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready and "STATUS=serving 1 guest(s)" in ready
        # the watch was up when READY was sent: the guest connects
        assert len(dom0.frontend(1).connect()) == 1
        assert dom0.stop_daemon(signal.SIGTERM) == 0
        msgs = []
        while "STOPPING=1" not in "".join(msgs):
            msgs.append(sock.recv(4096).decode())
    sock.close()


def test_notify_without_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_abstract_notify_socket(monkeypatch):
    import os
    name = f"pcibackd-test-notify-{os.getpid()}"      # unique: tests may run in parallel
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert systemd.notify("WATCHDOG=1") is True
    assert sock.recv(64) == b"WATCHDOG=1"
    sock.close()


def test_watchdog_interval(monkeypatch):
    import os
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


# ------------------------------------------------------------ the unit --
UNIT = Path(__file__).resolve().parents[2] / "etc" / "pcibackd.service"


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_orders_after_xen_without_hard_requirements():
    s = _unit_settings()
    assert "Requires" not in s and "BindsTo" not in s          # Debian 12 has no xenstored.service
    for dep in ("xen.service", "xenstored.service"):
        assert dep in " ".join(s["Wants"]) and dep in " ".join(s["After"])
    assert "ConditionVirtualization" not in s                 # a dom0 counts as "not virtualized"
    assert int(s["LimitNOFILE"][0]) >= 256 * 2 + 1024         # 256 guests and their workers
    assert s["ExecReload"] == ["/usr/local/sbin/pcibackd check-config --quiet", "/bin/kill -HUP $MAINPID"]
    assert s["Type"] == ["notify"]
    assert s["ExecStart"][0].startswith("/usr/local/sbin/pcibackd run")     # where ./dev install links it


def _verifiable_copy(tmp_path) -> Path:
    """The unit with its programs replaced by ones this machine has (verify checks they exist)."""
    text = UNIT.read_text().replace("/usr/local/sbin/pcibackd", shutil.which("true") or "/bin/true")
    copy = tmp_path / "pcibackd.service"
    copy.write_text(text)
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt install systemd)")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(_verifiable_copy(tmp_path))],
                       capture_output=True, text=True)
    assert p.returncode == 0 and "pcibackd.service" not in p.stderr, p.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt install systemd)")
def test_unit_hardening_exposure(tmp_path):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        str(_verifiable_copy(tmp_path))], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for pcibackd.service: (\d+\.\d)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 4.0          # was 9.6 UNSAFE without the hardening options
