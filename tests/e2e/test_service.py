"""The daemon as a service: SIGHUP re-reads the config file, STATUS= follows
the guests, a requested restart is logged as such, permissive mode warns."""

from __future__ import annotations

import signal
import socket

import psutil

from pcibackd.control.client import call
from simdom0.dom0 import SimDom0
from waiting import wait_until


def _notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    return sock


def _recv_until(sock, needle: str) -> str:
    got = []
    while needle not in "".join(got):
        got.append(sock.recv(4096).decode())
    return "".join(got)


def test_sighup_rereads_the_config_and_status_follows(tmp_path):
    sock = _notify_socket(tmp_path)
    with SimDom0(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "PCIBACKD_FAILPOINTS": "boot-slow@99"},
                 config={"stop_timeout": 5.0}) as dom0:
        dom0.start(daemon=False)
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        dom0.start_daemon()
        assert "STATUS=serving 1 guest(s)" in _recv_until(sock, "READY=1")
        assert "WARNING [supervisor] FAULT INJECTION ARMED: PCIBACKD_FAILPOINTS='boot-slow@99'" in dom0.log_tail(200)
        conf = dom0.dir / "pcibackd.toml"
        conf.write_text('[pcibackd]\nheartbeat_timeout = 200.0\nstop_timeout = 7.0\ncontrol_curve_dir = "/nonexistent/curve"\n')
        dom0.daemon.send_signal(signal.SIGHUP)
        msgs = _recv_until(sock, "READY=1")
        assert "RELOADING=1" in msgs
        log = wait_until(lambda: "SIGHUP: config" in (t := dom0.log_tail(200)) and t, what="the reload logged")
        assert "heartbeat_timeout=200.0 stop_timeout=7.0" in log          # key=value, not a dict
        assert "SIGHUP: control_curve_dir changed" in log and "takes effect when pcibackd restarts" in log
        conf.write_text("[pcibackd]\nheartbeat_timeout = -3\n")
        dom0.daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "heartbeat_timeout: must be > 0" in dom0.log_tail(200), what="the bad value refused")
        assert "SIGHUP: config not reloaded" in dom0.log_tail(200)
        assert dom0.daemon.poll() is None
        # a guest goes away: STATUS= follows without anyone asking
        dom0.toolstack.destroy(1)
        assert "STATUS=serving 0 guest(s)" in _recv_until(sock, "serving 0 guest(s)")
    sock.close()


def test_requested_restart_is_info_and_permissive_warns():
    with SimDom0(log_level="INFO").start() as dom0:
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        assert len(dom0.frontend(1).connect()) == 1
        pid = dom0.guest_status(1)["pid"]
        title = wait_until(lambda: "worker" in (t := " ".join(psutil.Process(pid).cmdline())) and t,
                           what="the worker's title")
        assert title.strip() == "pcibackd: worker dom1 (guest1)"
        assert call(dom0.runtime, "restart", {"domid": 1})["status"] == "ok"
        wait_until(lambda: (g := dom0.guest_status(1))["pid"] != pid and g["worker_state"] == "RUNNING",
                   what="the worker replaced")
        log = dom0.log_tail(200)
        assert "restart of domain 1's worker requested" in log
        assert "stopped for the requested restart" in log and "died" not in log
        assert not any(" WARNING " in ln for ln in log.splitlines() if "domain 1" in ln)
        rep = call(dom0.runtime, "permissive", {"mode": "on", "bdf": "0000:00:05.0"})
        assert rep["status"] == "ok", rep
        line = wait_until(lambda: next((ln for ln in dom0.log_tail(200).splitlines()
                                        if "permissive mode enabled" in ln), None), what="the warning")
        assert " WARNING " in line and "0000:00:05.0" in line and "pcibackctl permissive" in line
