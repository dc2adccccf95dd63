"""Every pcibackctl command against a running daemon on the simulated dom0,
as a subprocess, in table and JSON form, with its exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from pcibackd.wire.bdf import BDF
from simdom0.dom0 import SimDom0
from pcibackd.wire.pciif import Err
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
EDU, TESTDEV, E1000E, SPARE = "0000:00:05.0", "0000:00:06.0", "0000:02:00.0", "0000:00:07.0"
G0 = BDF(0, 0, 0, 0)


def ctl(dom0, *argv, timeout=30, **kw) -> subprocess.CompletedProcess:
    """``pcibackctl --runtime-dir <dom0> ARGV`` in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pcibackd.control.cli", "--runtime-dir", str(dom0.runtime), *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


def ok(dom0, *argv) -> str:
    p = ctl(dom0, *argv)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stderr == ""
    return p.stdout


def ok_json(dom0, *argv):
    return json.loads(ok(dom0, *argv, "--json"))


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def two_guests(dom0: SimDom0):
    """dom1: edu + e1000e, connected; dom2: pci-testdev, not connected; one spare device."""
    for dump, bdf in (("edu", EDU), ("pci-testdev", TESTDEV), ("e1000e", E1000E), ("rtl8139", SPARE)):
        dom0.add_device(dump, bdf)
    dom0.create_guest(1, [EDU, E1000E])
    dom0.create_guest(2, [TESTDEV])
    front = dom0.frontend(1)
    front.connect()
    wait_until(lambda: [(g["worker_state"], bool(g["served"])) for g in dom0.status()["guests"]]
               == [("RUNNING", True), ("RUNNING", False)], what="two RUNNING workers, dom1's scan in a heartbeat")
    # a report may come in the middle of the scan: wait for the one after its last empty slot
    wait_until(lambda: dom0.status()["guests"][0]["misses"].get("conf_read", {}).get("XEN_PCI_ERR_dev_not_found", 0)
               >= 250, what="dom1's whole bus scan in its reports")
    return front


@pytest.fixture
def guests(dom0):
    return dom0, two_guests(dom0)


# --------------------------------------------------------------- status --
def test_status_json(guests):
    dom0, front = guests
    assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    assert front.conf_read(G0, 1, 2)[0] == Err.invalid_offset
    st = wait_until(lambda: (s := ok_json(dom0, "status"))["guests"][0]["errors"].get("conf_read") and s,
                    what="the error in a heartbeat")
    d = st["daemon"]
    assert d["platform"] == "sim" and d["topology"] == "vpci" and d["pid"] == dom0.daemon.pid
    assert d["uptime"] >= 0 and d["version"] and d["control"]["ipc"] == str(dom0.runtime / "control.sock")
    assert d["control"]["tcp"] is None
    g1, g2 = st["guests"]
    assert (g1["domid"], g1["xenbus_state"], g1["worker_state"], g1["restarts"]) == (1, 4, "RUNNING", 0)
    assert (g2["domid"], g2["xenbus_state"], g2["worker_state"]) == (2, 3, "RUNNING")
    assert g1["pid"] != g2["pid"] and g1["pid"] != dom0.daemon.pid
    assert g1["served"]["conf_read"] >= 2 and g2["served"] == {}
    assert g1["errors"] == {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}}
    # the guest's scan of its bus: every empty slot answered dev_not_found, a miss and not an error
    assert g1["misses"]["conf_read"]["XEN_PCI_ERR_dev_not_found"] >= 250
    assert (g1["name"], g2["name"]) == ("guest1", "guest2") and d["xenstore_connected"] is True
    assert [(x["bdf"], x["vbdf"]) for x in g1["devices"]] == [(EDU, "0000:00:00.0"), (E1000E, "0000:00:01.0")]
    assert [(x["bdf"], x["vbdf"]) for x in g2["devices"]] == [(TESTDEV, "0000:00:00.0")]
    for g in (g1, g2):
        assert 0 < g["uss"] <= g["rss"] and g["cpu_seconds"] >= 0
        assert "latency_us" in g     # None until workers report latency
    # CPU percent: sampled by the supervisor from /proc, so an idle worker (it reports only when
    # something changes) has a figure too (tests/unit/test_procstats.py covers the window itself)
    st = ok_json(dom0, "status")
    assert all(0 <= g["cpu_percent"] <= 200 and g["cpu_window"] > 0 for g in st["guests"])


def test_status_table(guests):
    dom0, front = guests
    out = ok(dom0, "status")
    head, xs = out.splitlines()[:2]
    assert head.startswith("pcibackd ") and f"(pid {dom0.daemon.pid})" in head and "platform sim" in head
    assert "topology vpci" in head and xs.startswith("xenstore ") and xs.endswith(": connected")
    r = rows(out)
    assert ["2", "guest(s)"] in r
    header = next(x for x in r if x[:4] == ["DOMID", "NAME", "XENBUS", "WORKER"])
    assert header[4:] == ["PID", "RESTARTS", "RSS", "USS", "CPU", "CPU%", "OPS", "MISSES", "ERRORS", "P50", "P99"]
    st = {g["domid"]: g for g in dom0.status()["guests"]}
    g1 = next(x for x in r if x[:4] == ["1", "guest1", "Connected", "RUNNING"])
    assert g1[4] == str(st[1]["pid"]) and g1[5] == "0" and g1[6].endswith("M") and g1[8].endswith("s")
    assert g1[9] == "-" or g1[9].endswith("%")
    assert int(g1[11]) >= 250 and g1[12] == "0"           # the bus scan's empty slots: misses, not errors
    # op service time p50 / p99: a duration in the table's units (a loaded machine may reach ms)
    assert all(re.fullmatch(r"\d+us|\d+\.\dms", cell) for cell in g1[13:15]), g1[13:15]
    assert ["1", EDU, "0000:00:00.0", "no", "0", "off", "off", "no", "-"] in r
    assert ["1", E1000E, "0000:00:01.0", "no", "0", "off", "off", "yes", "-"] in r      # MSI-X prepared at seize
    assert ["2", TESTDEV, "0000:00:00.0", "no", "0", "off", "off", "no", "-"] in r
    assert next(x for x in r if x[:4] == ["2", "guest2", "Initialised", "RUNNING"])
    assert ["DOMID", "OPS", "BY", "TYPE", "MISSES", "BY", "CODE", "ERRORS", "BY", "CODE", "LAST", "EXIT"] in r
    assert any(x[:1] == ["1"] and x[1].startswith("conf_read=") and x[2].startswith("XEN_PCI_ERR_dev_not_found=")
               for x in r)


def test_status_without_guests(dom0):
    assert ok(dom0, "status").splitlines()[2] == "0 guest(s)"
    assert ok_json(dom0, "status")["guests"] == []


# ----------------------------------------------------------- list, devices --
def test_list(guests):
    dom0, _ = guests
    assert rows(ok(dom0, "list")) == [
        ["DOMID", "NAME", "WORKER", "XENBUS", "HOST", "BDF", "GUEST", "BDF"],
        ["1", "guest1", "RUNNING", "Connected", EDU, "0000:00:00.0"],
        ["1", "guest1", "RUNNING", "Connected", E1000E, "0000:00:01.0"],
        ["2", "guest2", "RUNNING", "Initialised", TESTDEV, "0000:00:00.0"]]
    assert ok_json(dom0, "list") == [
        {"domid": 1, "name": "guest1", "worker_state": "RUNNING", "xenbus_state": 4,
         "devices": [{"bdf": EDU, "vbdf": "0000:00:00.0"}, {"bdf": E1000E, "vbdf": "0000:00:01.0"}]},
        {"domid": 2, "name": "guest2", "worker_state": "RUNNING", "xenbus_state": 3,
         "devices": [{"bdf": TESTDEV, "vbdf": "0000:00:00.0"}]}]


def test_devices(guests):
    dom0, _ = guests
    assert rows(ok(dom0, "devices")) == [["BDF", "HELD", "BY", "LAST", "RESET", "QUARANTINED"],
                                          [EDU, "1", "-", "-"], [TESTDEV, "2", "-", "-"], [SPARE, "-", "-", "-"],
                                          [E1000E, "1", "-", "-"]]
    free = {"reset": None, "quarantined": False}
    assert ok_json(dom0, "devices") == [{"bdf": EDU, "held_by": 1, **free}, {"bdf": TESTDEV, "held_by": 2, **free},
                                        {"bdf": SPARE, "held_by": None, **free},
                                        {"bdf": E1000E, "held_by": 1, **free}]


# -------------------------------------------------------------- restart --
def test_restart_table_and_json(guests):
    dom0, front = guests
    before = dom0.guest_status(2)["pid"]
    assert ok(dom0, "restart", "2") == "restarting the worker of domain 2\n"
    g = wait_until(lambda: (g := dom0.guest_status(2))["restarts"] == 1 and g["worker_state"] == "RUNNING" and g,
                   what="dom2 restarted")
    assert g["pid"] != before
    assert ok_json(dom0, "restart", "1") == {"domid": 1}
    wait_until(lambda: (g := dom0.guest_status(1))["restarts"] == 1 and g["worker_state"] == "RUNNING",
               what="dom1 restarted")
    assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)         # the new worker serves the guest
    assert dom0.guest_status(2)["restarts"] == 1


def test_restart_errors(guests):
    dom0, _ = guests
    p = ctl(dom0, "restart", "9")
    assert p.returncode == 6 and "no guest with domid 9 (NOT_FOUND)" in p.stderr and p.stdout == ""
    assert "errno" not in p.stderr
    p = ctl(dom0, "restart", "9", "--json")
    assert p.returncode == 6 and json.loads(p.stdout) == {"error": {
        "name": "NOT_FOUND", "errno": 5, "reason": "no guest with domid 9", "exit_code": 6}}
    p = ctl(dom0, "restart", "0")
    assert p.returncode == 2 and "domid must be 1.." in p.stderr
    p = ctl(dom0, "restart", "dom1")
    assert p.returncode == 2 and "invalid int value" in p.stderr
    assert [g["restarts"] for g in dom0.status()["guests"]] == [0, 0]


# ----------------------------------------------------------- permissive --
def _permissive(dom0, bdf):
    return next(d["permissive"] for g in dom0.status()["guests"] for d in g["devices"] if d["bdf"] == bdf)


def test_permissive_on_off(guests):
    dom0, front = guests
    assert not _permissive(dom0, EDU)
    assert ok(dom0, "permissive", "on", EDU) == f"permissive on for {EDU} (domain 1)\n"
    wait_until(lambda: _permissive(dom0, EDU), what="permissive on in a heartbeat")
    assert not _permissive(dom0, E1000E)
    r = rows(ok(dom0, "status"))
    assert ["1", EDU, "0000:00:00.0", "yes"] in [x[:4] for x in r]
    assert ["1", E1000E, "0000:00:01.0", "no"] in [x[:4] for x in r]
    assert ok_json(dom0, "permissive", "off", "00:05.0") == {"bdf": EDU, "domid": 1, "permissive": False}
    wait_until(lambda: not _permissive(dom0, EDU), what="permissive off in a heartbeat")
    assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)


def test_permissive_errors(guests):
    dom0, _ = guests
    p = ctl(dom0, "permissive", "on", SPARE)
    assert p.returncode == 6 and f"{SPARE} is not assigned to any guest" in p.stderr
    p = ctl(dom0, "permissive", "on", "00:05")
    assert p.returncode == 2 and "not a PCI address" in p.stderr
    p = ctl(dom0, "permissive", "yes", EDU)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    assert not _permissive(dom0, EDU)


# -------------------------------------------------------- policy reload --
POLICY_OK = 'permissive = false\n[device."0000:00:06.0"]\npermissive = true\n'


@pytest.fixture
def policy_dom0(request, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("permissive = false\n")
    dom0 = SimDom0(log_level="DEBUG", config={"policy_path": str(policy)}).start()
    yield dom0, policy
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        print(dom0.log_tail(80))
    dom0.stop()


def test_policy_reload(policy_dom0):
    dom0, policy = policy_dom0
    two_guests(dom0)
    assert not _permissive(dom0, TESTDEV)
    policy.write_text(POLICY_OK)
    assert ok(dom0, "policy", "reload") == f"policy {policy} reloaded by 2 worker(s)\n"
    wait_until(lambda: _permissive(dom0, TESTDEV), what="the reloaded policy in a heartbeat")
    policy.write_text("permissive = false\n")
    rep = ok_json(dom0, "policy", "reload")
    assert rep["policy"] == str(policy) and [w["domid"] for w in rep["workers"]] == [1, 2]
    wait_until(lambda: not _permissive(dom0, TESTDEV), what="the second reload")


def test_policy_reload_of_a_broken_file_changes_nothing(policy_dom0):
    dom0, policy = policy_dom0
    two_guests(dom0)
    policy.write_text(POLICY_OK)
    ok(dom0, "policy", "reload")
    wait_until(lambda: _permissive(dom0, TESTDEV), what="the reloaded policy")
    policy.write_text("permissive = [\n")
    p = ctl(dom0, "policy", "reload")
    assert p.returncode == 1 and "policy not reloaded" in p.stderr and "(COMMAND_FAILED)" in p.stderr
    assert p.stdout == ""
    assert _permissive(dom0, TESTDEV) and all(g["worker_state"] == "RUNNING" for g in dom0.status()["guests"])


def test_sighup_reloads_the_policy_in_every_worker(policy_dom0):
    dom0, policy = policy_dom0
    two_guests(dom0)
    assert not _permissive(dom0, TESTDEV)
    policy.write_text(POLICY_OK)
    dom0.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: _permissive(dom0, TESTDEV), what="the policy reloaded on SIGHUP in a heartbeat")
    assert "SIGHUP: policy" in dom0.log_tail(200) and "sent to 2 worker(s)" in dom0.log_tail(200)
    policy.write_text("permissive = [\n")
    dom0.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: policy not reloaded" in dom0.log_tail(200), what="the broken file refused")
    assert _permissive(dom0, TESTDEV) and all(g["worker_state"] == "RUNNING" for g in dom0.status()["guests"])
    assert dom0.daemon.poll() is None


# ------------------------------------------------------------ log level --
def test_log_level(guests):
    dom0, _ = guests
    assert ok(dom0, "log-level", "warning") == "log level WARNING (daemon and 2 worker(s))\n"
    mark = len(dom0.log_tail(100000).splitlines())
    ok(dom0, "restart", "2")            # logs at INFO, now filtered out
    wait_until(lambda: (g := dom0.guest_status(2))["restarts"] == 1 and g["worker_state"] == "RUNNING",
               what="dom2 restarted")
    new = dom0.log_tail(100000).splitlines()[mark:]
    assert not [line for line in new if " INFO " in line or " DEBUG " in line], new
    rep = ok_json(dom0, "log-level", "DEBUG")
    assert rep["level"] == "DEBUG" and [w["domid"] for w in rep["workers"]] == [1, 2]
    p = ctl(dom0, "log-level", "chatty")
    assert p.returncode == 2 and "level must be one of" in p.stderr


# ------------------------------------------------------- daemon not there --
def test_daemon_not_running(sim_dom0):
    p = ctl(sim_dom0, "status")
    assert p.returncode == 3 and "pcibackd is not running" in p.stderr and p.stdout == ""
    sim_dom0.start_daemon()
    assert ok_json(sim_dom0, "status")["guests"] == []
    sim_dom0.stop_daemon()
    p = ctl(sim_dom0, "list", "--json")
    assert p.returncode == 3 and "pcibackd is not running" in p.stderr
    err = json.loads(p.stdout)["error"]
    assert (err["name"], err["errno"], err["exit_code"]) == ("NOT_RUNNING", None, 3) and "not running" in err["reason"]


# ------------------------------------------------------- a stuck worker --
def test_a_stuck_worker_times_out_a_fan_out_and_never_stalls_status(guests):
    dom0, front = guests
    stuck = dom0.guest_status(2)["pid"]
    os.kill(stuck, signal.SIGSTOP)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    try:
        # One client, two requests back to back: a fan-out that waits for the
        # stopped worker, then status.  Replies come in the order the daemon
        # sends them; one that served requests one at a time would answer the
        # fan-out first (after its timeout), so the order is the proof, not a clock.
        s.connect(f"ipc://{dom0.runtime / 'control.sock'}")
        s.send(json.dumps({"id": "fan-out", "command": "log-level", "args": {"level": "INFO"}}).encode())
        s.send(json.dumps({"id": "status", "command": "status"}).encode())
        replies = []
        for _ in range(2):
            assert s.poll(30_000), f"no reply after {[r['id'] for r in replies]}"
            replies.append(json.loads(s.recv()))
        status, fan_out = replies
        assert [status["id"], fan_out["id"]] == ["status", "fan-out"]
        assert status["status"] == "ok" and [g["domid"] for g in status["result"]["guests"]] == [1, 2]
        assert fan_out["status"] == "error"
        assert "no answer within 2.0 s from the worker(s) of domain(s) 2" in fan_out["reason"]
        assert front.conf_read(G0, 0, 2) == (Err.success, 0x1234)
    finally:
        s.close()
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass      # the heartbeat check already replaced the stopped worker (1 s default)
