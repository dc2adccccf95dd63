"""The shipped unit (etc/pcibackd.service) under a real systemd: a private
systemd booted as PID 1 of its own namespaces (tests/systemd_box.py), the unit
installed unchanged, a drop-in for what only the simulated dom0 needs.

Checked: `systemctl start` reaches active through READY=1 with STATUS= shown;
a supervisor killed by SIGKILL leaves its workers serving (KillMode=process),
Restart=on-failure starts a supervisor that adopts the same worker pids while
a guest's ops keep succeeding; `systemctl restart` keeps the same workers
(SIGTERM hands them over, the new supervisor adopts them) while a guest's ops
keep succeeding; `systemctl reload` re-reads the config and a bad one fails
the reload and changes nothing; `systemctl stop` then `start` within the
handover grace adopts the workers, and a stop leaves no process behind once
the grace ran out, the guests' state resumed by a later start; `systemd-analyze
verify` accepts the unit as installed and `systemd-analyze security` rates it
(printed).  Every hardening option of the unit is in force throughout.

Skipped, with the reason, where a systemd cannot boot (not root, no systemd,
no cgroup2): the real-Xen lane's dom0 boots the same unit for real."""

from __future__ import annotations

import grp
import os
import re
import signal
import sys
from pathlib import Path

import psutil
import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.wire.paths import backend_path
from pcibackd.worker.privileges import LOCKED_UID
from helpers import Traffic
from simdom0.dom0 import SimDom0
from systemd_box import SystemdBox, unavailable
from waiting import process_gone, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "xenlane"))
import sandbox  # noqa: E402

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"a private systemd: {WHY_NOT}")

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "etc" / "pcibackd.service"
G0 = BDF(0, 0, 0, 0)
EDU_ID = 0x1234                # vendor ids of the two simulated devices
TESTDEV_ID = 0x1b36
VENV_BIN = Path(sys.executable).parent

# What differs from a dom0 that installed the unit, and why; nothing else is overridden.
DROP_IN = """\
[Unit]
# The simulated dom0 is no Xen domain: no /proc/xen (resets the unit's only condition).
ConditionPathIsDirectory=

[Service]
# ... and no /proc/xen/capabilities to grep.
ExecStartPre=
# The shipped command line with the simulated platform and its xenstored.
ExecStart=
ExecStart=/usr/local/sbin/pcibackd run --platform sim:{sim} --xenstored-path {xenstored}
# The checkout (the venv behind /usr/local/sbin/pcibackd) may sit under /tmp, which
# PrivateTmp= hides; an installed pcibackd lives in /opt/pcibackd.
BindReadOnlyPaths={repo}
{python}"""

# The test's interpreter (the venv's base) may be a pyenv under /root, which ProtectHome=yes
# hides: then home directories become empty read-only tmpfs instead, with that one path
# bound in (a dom0's venv uses /usr/bin/python3).
PYTHON_UNDER_HOME = """\
ProtectHome=tmpfs
BindReadOnlyPaths={prefix}
"""


def _drop_in(dom0: SimDom0) -> str:
    prefix = Path(sys.base_prefix).resolve()
    under_home = prefix.parts[1:2] in (("root",), ("home",))
    return DROP_IN.format(sim=dom0.sim_dir, xenstored=dom0.xenstored.socket_path, repo=REPO,
                          python=PYTHON_UNDER_HOME.format(prefix=prefix) if under_home else "")


CONFIG = """\
[pcibackd]
log_level = "DEBUG"
orphan_grace = 60.0
handover_grace = 15.0
status_group = "nogroup"
"""


class Served:
    """The simulated dom0 (oxenstored, two guests) and the box running the unit."""

    def __init__(self, dom0: SimDom0, box: SystemdBox):
        self.dom0, self.box = dom0, box
        self.config = None          # the box's /etc/pcibackd/pcibackd.toml, once booted
        self.fronts: dict[int, object] = {}

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show("pcibackd.service", *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def guest(self, domid: int, pred, what: str, timeout: float = 30.0) -> dict:
        def match():
            try:
                g = self.dom0.guest_status(domid)
            except Exception:          # the supervisor between two lives
                return None
            return g if g is not None and pred(g) else None
        return wait_until(match, timeout=timeout, what=lambda: f"dom{domid}: {what}\n{self.log_tail()}")

    def active(self, what: str) -> dict:
        return wait_until(lambda: (s := self.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText",
                                                  "Result"))["ActiveState"] == "active" and s["MainPID"] != "0"
                          and s["StatusText"].startswith("serving") and s,
                          timeout=60, what=lambda: f"pcibackd active again after {what}\n{self.diagnose()}")

    def log_tail(self, n: int = 60) -> str:
        """The unit's last ``n`` journal lines, all with 0 (the daemon's log and systemd's words about it)."""
        return self.box.journal("-u", "pcibackd.service", "-o", "cat", *(("-n", str(n)) if n else ()))

    def diagnose(self) -> str:
        st = self.box.systemctl("status", "pcibackd.service", check=False)
        return f"{st.stdout}{st.stderr}\n--- daemon log ---\n{self.log_tail()}"


@pytest.fixture(scope="module")
def served():
    dom0 = SimDom0()
    box = None
    try:
        dom0.start(daemon=False)
        dom0.add_device("edu", "0000:00:05.0")
        dom0.add_device("pci-testdev", "0000:00:06.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        dom0.create_guest(2, ["0000:00:06.0"])
        box = SystemdBox(dom0.dir / "box")
        (box.units / "pcibackd.service").write_bytes(UNIT.read_bytes())        # as shipped
        (box.units / "pcibackd.service.d").mkdir()
        (box.units / "pcibackd.service.d" / "sim.conf").write_text(_drop_in(dom0))
        (box.dir / "pcibackd.toml").write_text(CONFIG)
        # what `./dev install` does on a dom0, in the box's overlays
        box.prepare(f"mkdir -p /etc/pcibackd\ncp {box.dir}/pcibackd.toml /etc/pcibackd/pcibackd.toml\n"
                    f"ln -sf {VENV_BIN}/pcibackd {VENV_BIN}/pcibackctl /usr/local/sbin/\n")
        box.start()
        s = Served(dom0, box)
        s.config = box.path("/etc/pcibackd/pcibackd.toml")
        dom0.runtime = box.path("/run/pcibackd")        # RuntimeDirectory=, seen from outside the box
        yield s
    finally:
        try:
            if box is not None:
                box.stop()
        finally:
            dom0.stop()


@pytest.fixture(autouse=True)
def _journal_on_failure(request, served):
    """A failed test prints the unit's journal (the daemon's log and systemd's words)."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("\n----- journal of pcibackd.service -----\n" + served.log_tail(150))


def _started(served: Served) -> None:
    if served.show("ActiveState")["ActiveState"] != "active":
        served.box.systemctl("start", "pcibackd.service")
        served.active("start")
    for domid, vendor in ((1, EDU_ID), (2, TESTDEV_ID)):
        if domid not in served.fronts:
            front = served.dom0.frontend(domid)
            front.op_timeout = 60      # an op answered late is the finding, a lost one the failure
            assert len(front.connect(timeout=30)) == 1
            served.fronts[domid] = front
        assert served.fronts[domid].conf_read(G0, 0, 2) == (Err.success, vendor)


def _serving(g: dict) -> bool:
    """A worker serves the guest, connected: booted, not only spawned.  (A worker still
    booting when its supervisor dies waits at the device gate for the successor:
    tests/e2e/test_handover.py.)"""
    return (g["pid"] is not None and g["worker_state"] in ("STARTING", "RUNNING")
            and g["xenbus_state"] == S.Connected and g["connected"])


def _adopted(g: dict) -> bool:
    """Taken over by the new supervisor, RUNNING: a worker reports as soon as its link
    reaches the new supervisor, not at its next keepalive (heartbeat_interval, 20 s)."""
    return g["adopted"] and g["worker_state"] == "RUNNING"


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:160]
    except psutil.Error:
        return "(gone)"


def test_start_reaches_active_through_ready_with_status(served):
    box = served.box
    p = box.systemctl("start", "pcibackd.service", check=False)      # Type=notify: returns after READY=1
    assert p.returncode == 0, served.diagnose()
    s = served.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess", "MainPID")
    assert (s["ActiveState"], s["SubState"], s["Type"], s["NotifyAccess"]) == ("active", "running", "notify",
                                                                               "main"), s
    assert s["StatusText"].startswith("serving 2 guest(s)"), s
    _started(served)
    wait_until(lambda: served.show("StatusText")["StatusText"] == "serving 2 guest(s)",      # kept current
               what=lambda: f"STATUS= once both workers run: {served.show('StatusText')}")
    # every hardening option is in force for the daemon started this way
    supervisor = box.host_pid(int(s["MainPID"]))
    status = Path(f"/proc/{supervisor}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(r"^Seccomp:\s+2$", status, re.M), status
    # the daemon could give its private parts to the locked uid (CAP_CHOWN in the bounding set)
    runtime = served.dom0.runtime
    for private in ("claims", "workers", "irq"):
        assert (runtime / private).stat().st_uid == LOCKED_UID, private
    assert (runtime / "status.sock").stat().st_gid == grp.getgrnam("nogroup").gr_gid, served.log_tail()
    assert box.show("pcibackd.service", "NRestarts")["NRestarts"] == "0"


def test_admin_tools_and_journal_fields(served):
    """What an administrator does on the running unit: pcibackctl reaches it
    through RuntimeDirectory=, the log has a priority and DOMID=/BDF= per line."""
    _started(served)
    box = served.box
    p = box.run("pcibackctl", "--json", "status", check=False)
    assert p.returncode == 0 and '"domid": 1' in p.stdout, p.stdout + p.stderr
    box.run("pcibackctl", "permissive", "on", "0000:00:05.0")
    try:
        wait_until(lambda: "permissive mode enabled" in box.journal("-u", "pcibackd.service", "-p", "warning",
                                                                    "-o", "cat"),
                   what=lambda: f"the warning at priority warning\n{served.log_tail(20)}")
    finally:
        box.run("pcibackctl", "permissive", "off", "0000:00:05.0")
    assert "exported 0000:00:05.0" in box.journal("-u", "pcibackd.service", "DOMID=1", "-o", "cat")
    assert "permissive" in box.journal("-u", "pcibackd.service", "BDF=0000:00:05.0", "-o", "cat")


def test_supervisor_crash_keeps_workers_and_guests_and_is_adopted(served):
    _started(served)
    box = served.box
    before = {d: served.guest(d, _serving, "a worker")["pid"] for d in (1, 2)}
    host_pids = {d: box.host_pid(p) for d, p in before.items()}
    main, restarts = served.main_pid(), int(served.show("NRestarts")["NRestarts"])
    with Traffic(served.fronts[1], EDU_ID) as traffic:
        box.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", "pcibackd.service")
        wait_until(lambda: (s := served.show("MainPID", "NRestarts", "ActiveState"))["NRestarts"]
                       == str(restarts + 1) and s["ActiveState"] == "active" and int(s["MainPID"]) != main and s,
                       timeout=60, what=lambda: f"Restart=on-failure\n{served.diagnose()}")
        for d in (1, 2):
            g = served.guest(d, _adopted, "adopted")
            assert g["pid"] == before[d] and g["restarts"] == 0, g
            assert not process_gone(host_pids[d])
        traffic.wait_more()
    assert traffic.bad == 0 and served.fronts[1].timeouts == 0
    assert traffic.states == {"4"} and traffic.front_states == {S.Connected}     # never reconnected
    assert "adopt" in served.log_tail(400).lower()
    print(f"\nsupervisor SIGKILL: {traffic.ops} ops of dom1 across it, none failed; "
          f"the slowest took {traffic.slowest:.2f} s")
    assert served.fronts[2].conf_read(G0, 0, 2) == (Err.success, TESTDEV_ID)
    served.active("the crash")


def _taken_over(g: dict) -> bool:
    return g["adopted"] and g["worker_state"] == "RUNNING" and g["xenbus_state"] == S.Connected


def test_restart_hands_the_workers_over(served, record_property):
    """SIGTERM (the stop half of a restart) hands the workers over: they serve on,
    KillMode=process leaves them, the new supervisor adopts the same pids while
    the guest's ops keep being answered by them."""
    _started(served)
    box = served.box
    before = {d: served.guest(d, _serving, "a worker")["pid"] for d in (1, 2)}
    main = served.main_pid()
    with Traffic(served.fronts[1], EDU_ID) as traffic:
        box.systemctl("restart", "pcibackd.service")
        s = served.active("restart")
        assert int(s["MainPID"]) != main and s["Result"] == "success"
        for d in (1, 2):
            g = served.guest(d, _taken_over, "adopted after the restart")
            assert g["pid"] == before[d] and g["restarts"] == 0, g
        # adopted workers report at once: none is left "starting" in STATUS=
        wait_until(lambda: served.show("StatusText")["StatusText"] == "serving 2 guest(s)",
                   what=lambda: f"STATUS= after the restart: {served.show('StatusText')}")
        traffic.wait_more()
    assert traffic.bad == 0 and served.fronts[1].timeouts == 0, served.log_tail()
    assert traffic.states == {"4"} and traffic.front_states == {S.Connected}
    assert served.log_tail(200).count("a new supervisor took over") >= 2
    record_property("restart_slowest_op_s", round(traffic.slowest, 2))
    print(f"\nsystemctl restart: {traffic.ops} ops of dom1 across it, none failed; "
          f"the slowest took {traffic.slowest:.2f} s")
    assert served.fronts[2].conf_read(G0, 0, 2) == (Err.success, TESTDEV_ID)


def test_reload_rereads_config_and_a_bad_one_fails_without_change(served):
    _started(served)
    box = served.box
    main = served.main_pid()
    good = served.config.read_text()
    try:
        served.config.write_text(good + "heartbeat_timeout = 200.0\n")
        box.systemctl("reload", "pcibackd.service")       # check-config, then SIGHUP
        # systemd 252 returns once kill -HUP did (Type=notify-reload, which waits, is 253's)
        wait_until(lambda: "heartbeat_timeout=200.0" in served.log_tail(0), what=lambda: served.log_tail(40))
        s = served.active("reload")
        assert int(s["MainPID"]) == main
        hups = served.log_tail(0).count("SIGHUP")
        served.config.write_text(good + "heartbeat_timeout = -3\n")
        p = box.systemctl("reload", "pcibackd.service", check=False)
        assert p.returncode != 0, "a config that does not check was reloaded"
        log = served.log_tail(0)
        assert "/etc/pcibackd/pcibackd.toml: heartbeat_timeout: must be > 0" in log      # check-config's word
        assert log.count("SIGHUP") == hups                      # the daemon was never signalled
        s = served.active("a refused reload")
        assert int(s["MainPID"]) == main
        assert served.fronts[1].conf_read(G0, 0, 2) == (Err.success, EDU_ID)
    finally:
        served.config.write_text(good)
    box.systemctl("reload", "pcibackd.service")


def test_analyze_verify_and_security_score(served, record_property):
    box = served.box
    unit = box.units / "pcibackd.service"          # the shipped file, its programs present in the box
    p = box.run("systemd-analyze", "verify", "--man=no", str(unit), check=False)
    assert p.returncode == 0 and "pcibackd.service" not in p.stderr, p.stdout + p.stderr
    p = box.run("systemd-analyze", "security", "--no-pager", "pcibackd.service", check=False)
    m = re.search(r"Overall exposure level for pcibackd.service: (\d+\.\d) (\S+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    print(f"\nsystemd-analyze security pcibackd (running unit): {m.group(1)} {m.group(2)}")
    record_property("exposure", m.group(1))
    assert float(m.group(1)) <= 4.0


def test_every_hardening_option_takes_effect(served):
    """Each hardening option of the unit as the kernel shows it on the running
    supervisor (xenlane/sandbox.py: the Xen lane runs the same checks on a real dom0,
    where the device filter also has /dev/xen files to show)."""
    _started(served)
    box = served.box
    pid = box.host_pid(int(served.show("MainPID")["MainPID"]))
    ev = sandbox.gather(pid, box.pid, box.systemctl("show", "pcibackd.service").stdout)
    results = sandbox.check_all(sandbox.unit_options(box.units / "pcibackd.service"), ev)
    assert {r[0] for r in results} >= {"unit-ProtectSystem", "unit-CapabilityBoundingSet", "unit-SystemCallFilter"}
    failed = [r for r in results if r[1] != "PASS" and r[0] not in ("unit-DevicePolicy", "unit-DeviceAllow")]
    assert not failed, "\n".join(" ".join(r) for r in failed)


WATCHDOG_DROP_IN = """\
[Service]
# A hung supervisor found in seconds instead of the unit's 30 s (+ 15 s to abort): the test's time.
WatchdogSec=4s
TimeoutAbortSec=2s
"""


def test_watchdog_ends_a_hung_supervisor_and_the_next_adopts(served):
    """WatchdogSec=: a supervisor that stops pinging (SIGSTOP) is aborted, then killed;
    KillMode=process leaves its workers serving; the restarted one adopts them."""
    _started(served)
    box = served.box
    extra = box.units / "pcibackd.service.d" / "watchdog.conf"
    extra.write_text(WATCHDOG_DROP_IN)
    try:
        box.systemctl("daemon-reload")
        box.systemctl("restart", "pcibackd.service")
        served.active("the restart with a short watchdog")
        pinged = served.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
        wait_until(lambda: served.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != pinged,
                   what="the supervisor's next WATCHDOG=1")
        before = {d: served.guest(d, _serving, "a worker")["pid"] for d in (1, 2)}
        s = served.show("MainPID", "NRestarts")
        with Traffic(served.fronts[1], EDU_ID) as traffic:
            os.kill(box.host_pid(int(s["MainPID"])), signal.SIGSTOP)
            wait_until(lambda: (n := served.show("NRestarts", "ActiveState", "MainPID"))["NRestarts"]
                       == str(int(s["NRestarts"]) + 1) and n["ActiveState"] == "active" and n["MainPID"] != s["MainPID"],
                       timeout=60, what=lambda: f"the watchdog's restart\n{served.diagnose()}")
            for d in (1, 2):
                g = served.guest(d, _adopted, "adopted")
                assert g["pid"] == before[d], g
            traffic.wait_more()
        assert traffic.bad == 0 and served.fronts[1].timeouts == 0
        assert traffic.states == {"4"} and traffic.front_states == {S.Connected}
        assert "Watchdog timeout" in served.log_tail(0)
        assert served.fronts[2].conf_read(G0, 0, 2) == (Err.success, TESTDEV_ID)
    finally:
        extra.unlink()
        box.systemctl("daemon-reload")


def test_stop_hands_over_then_leaves_nothing_running_and_guests_connected(served):
    """`systemctl stop` is a SIGTERM like a restart's: the unit is inactive at once,
    its workers serve on for handover_grace.  A `start` within it adopts them; after
    it they stop (the cgroup empties), leaving the guests' state a later start resumes."""
    _started(served)
    box = served.box
    cgroup = served.show("ControlGroup")["ControlGroup"]
    procs = box.path(f"/sys/fs/cgroup{cgroup}/cgroup.procs")

    def left() -> str:
        pids = procs.read_text().split() if procs.exists() else []      # host pids: read from the host
        return "\n".join(f"{p}: {_cmdline(int(p))}" for p in pids)
    before = {d: served.guest(d, _serving, "a worker")["pid"] for d in (1, 2)}
    box.systemctl("stop", "pcibackd.service")
    s = served.show("ActiveState", "Result")
    assert s == {"ActiveState": "inactive", "Result": "success"}, served.diagnose()
    print(f"\nleft in the cgroup right after stop:\n{left()}")
    box.systemctl("start", "pcibackd.service")           # within handover_grace: the same workers
    served.active("a start right after a stop")
    for d in (1, 2):
        assert served.guest(d, _taken_over, "adopted after stop and start")["pid"] == before[d]
    box.systemctl("stop", "pcibackd.service")
    wait_until(lambda: not left(), timeout=60, what=lambda: f"the unit's cgroup to empty after stop:\n{left()}")
    journal = served.log_tail(60)
    print("\nthe journal after stop:\n" + "\n".join(ln for ln in journal.splitlines()
                                                   if "handing" in ln or "remain" in ln.lower()))
    assert journal.count("no supervisor took over within the handover grace") >= 2, journal
    # the workers left the guests' xenbus state for a successor
    assert served.dom0.xs.read(f"{backend_path(1)}/state") == "4"
    _started(served)                                      # resumed by fresh workers, guests never reconnected
    for d in (1, 2):
        g = served.guest(d, lambda g: not g["adopted"] and g["worker_state"] == "RUNNING"
                         and g["xenbus_state"] == S.Connected, "resumed after the grace")
        assert g["pid"] != before[d], g
    assert served.fronts[1].state() == S.Connected
