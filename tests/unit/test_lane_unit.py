"""The Xen lane starts pcibackd through etc/pcibackd.service's own command lines
(xenlane/unitfile.py parses the unit, xenlane/daemonctl.py runs it as systemd
would): checked here against the real unit file and a stand-in daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.waiting import process_gone, wait_until

REPO = Path(__file__).resolve().parents[2]
LANE = REPO / "xenlane"
sys.path.insert(0, str(LANE))
import unitfile  # noqa: E402

INSTALLED = "/usr/local/sbin/pcibackd"


def test_the_real_unit_parses_into_what_systemd_runs():
    svc = unitfile.parse_service((REPO / "etc/pcibackd.service").read_text(), {INSTALLED: "/venv/bin/pcibackd"})
    assert svc.start.argv[:2] == ("/venv/bin/pcibackd", "run")
    assert svc.reload, "ExecReload= is what `systemctl reload` runs"
    assert any("$MAINPID" in c.argv for c in svc.reload)
    assert svc.seconds("WatchdogSec", 0) > 0
    assert svc.environment.get("PYTHONNOUSERSITE") == "1"


def test_continuations_prefixes_resets_and_time_spans():
    text = textwrap.dedent("""\
        [Unit]
        ExecStart=/not/this
        [Service]
        ExecStartPre=/bin/false
        ExecStartPre=
        ExecStartPre=-/bin/true \\
            --flag "two words"
        ExecStart=/usr/local/sbin/pcibackd run
        Environment=A=1 "B=x y"
        ; a comment
        TimeoutStopSec=1min 30s
        """)
    svc = unitfile.parse_service(text, {INSTALLED: "/v/pcibackd"})
    assert [c.argv for c in svc.start_pre] == [("/bin/true", "--flag", "two words")]
    assert svc.start_pre[0].ignore_failure
    assert svc.start.argv == ("/v/pcibackd", "run")
    assert svc.environment == {"A": "1", "B": "x y"}
    assert svc.seconds("TimeoutStopSec", 0) == 90.0
    assert unitfile.substitute(("kill", "-HUP", "$MAINPID", "${MAINPID}x"), {"MAINPID": "42"}) == \
        ["kill", "-HUP", "42", "42x"]
    with pytest.raises(unitfile.UnitError):
        unitfile.parse_service("[Service]\nType=notify\n")


FAKE = """\
#!{python}
import os, signal, socket, sys, time
if sys.argv[1] == "check-config":
    sys.exit(int(os.environ.get("FAKE_CHECK_RC", "0")))
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ["NOTIFY_SOCKET"]); s.send(msg.encode())
with open(os.environ["FAKE_OUT"], "w") as f:
    nnp = [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1]
    f.write(" ".join([os.environ["PATH"], os.environ.get("WATCHDOG_PID", "-"), str(os.getpid()),
                      os.environ.get("PYTHONNOUSERSITE", "-"), oct(os.umask(0)), nnp, os.environ.get("HOME", "-")]))
signal.signal(signal.SIGHUP, lambda *a: (notify("RELOADING=1"), notify("READY=1")))
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
notify("READY=1")
while True:
    notify("WATCHDOG=1")
    time.sleep(0.05)
"""


def test_daemonctl_runs_the_unit_as_systemd_would(tmp_path):
    fake = tmp_path / "pcibackd"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    unit = tmp_path / "t.service"
    unit.write_text(textwrap.dedent(f"""\
        [Service]
        Type=notify
        ExecStartPre=/bin/true
        ExecStart={INSTALLED} run --platform xen
        ExecReload={INSTALLED} check-config --quiet
        ExecReload=/bin/kill -HUP $MAINPID
        Environment=PYTHONNOUSERSITE=1 FAKE_OUT={tmp_path}/env
        WatchdogSec=30s
        TimeoutStopSec=5
        UMask=0077
        NoNewPrivileges=yes
        """))
    files = {k: tmp_path / k for k in ("pid", "log", "notify")}
    ctl = [sys.executable, str(LANE / "daemonctl.py")]
    mapping = ["--map", f"{INSTALLED}={fake}"]
    start = subprocess.run([*ctl, "unit-start", str(unit), str(files["pid"]), str(files["log"]),
                            str(files["notify"]), "30", *mapping], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "HOME": "/nonexistent-home"})
    assert start.returncode == 0, start.stdout + start.stderr
    pid = int(files["pid"].read_text())
    try:
        path, wd_pid, own_pid, nousersite, umask, nnp, home = (tmp_path / "env").read_text().split()
        assert path == unitfile.SYSTEMD_PATH and home == "-", "systemd's clean environment, not the caller's"
        assert wd_pid == own_pid == str(pid), "WATCHDOG_PID is the main process"
        assert (nousersite, umask, nnp) == ("1", "0o77", "1")
        wait_until(lambda: "WATCHDOG=1" in files["notify"].read_text(), what="a watchdog ping logged")
        assert all(f" pid={pid} " in line for line in files["notify"].read_text().splitlines())
        reload = subprocess.run([*ctl, "unit-reload", str(unit), str(files["pid"]), *mapping],
                                capture_output=True, text=True, timeout=60)
        assert reload.returncode == 0, reload.stdout + reload.stderr
        wait_until(lambda: "RELOADING=1" in files["notify"].read_text(), what="RELOADING=1 after SIGHUP")
        bad = subprocess.run([*ctl, "unit-reload", str(unit), str(files["pid"]), *mapping,
                              "--env", "FAKE_CHECK_RC=1"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "kill" not in bad.stdout, "a failing check-config stops the reload"
    finally:
        stop = subprocess.run([*ctl, "unit-stop", str(unit), str(files["pid"])], capture_output=True, text=True,
                              timeout=60)
    assert stop.returncode == 0, stop.stdout
    wait_until(lambda: process_gone(pid), what="the stand-in daemon gone")
