"""An administrator's device lifecycle on the simulated dom0: [devices] hide, the assignable
pool, pci-attach/detach/list and create with pci=, each with its bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcibackd.control import cli
from pcibackd.wire.paths import backend_path
from pcibackd.wire.pciif import XenbusState as S
from simdom0 import drivers
from simdom0.dom0 import SimDom0
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
EDU, TESTDEV, TESTDEV1, E1000E = "0000:00:05.0", "0000:00:06.0", "0000:00:06.1", "0000:02:00.0"


def ctl(dom0, *argv, wait=True):
    """pcibackctl ARGV: in this process (fast), or a subprocess to run beside the guest (wait=False)."""
    argv = ["--runtime-dir", str(dom0.runtime), *argv]
    if not wait:
        cmd = [sys.executable, "-m", "pcibackd.control.cli", *argv]
        env = dict(os.environ, PYTHONPATH=str(ROOT), XENSTORED_PATH=dom0.xenstored.socket_path)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def ok(dom0, *argv) -> str:
    p = ctl(dom0, *argv)
    assert p.returncode == 0, (p.stdout, p.stderr)
    return p.stdout


def fails(dom0, code, *argv) -> str:
    p = ctl(dom0, *argv)
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    return p.stderr


def pool(dom0) -> dict:
    return {f["bdf"]: f for f in json.loads(ok(dom0, "--json", "assignable-list"))["functions"]}


def pci_root(dom0) -> Path:
    return dom0.sim_dir / "pci"


def devices(dom0):
    for dump, bdf in (("edu", EDU), ("pci-testdev", TESTDEV), ("edu", TESTDEV1), ("e1000e", E1000E)):
        dom0.add_device(dump, bdf)
        drivers.set_driver(pci_root(dom0), bdf, "e1000e" if dump == "e1000e" else dump)


@pytest.fixture
def host(request, tmp_path, monkeypatch):
    """A simulated dom0 with four functions bound to dom0 drivers; the daemon not started."""
    conf = tmp_path / "pcibackd.toml"
    dom0 = SimDom0(log_level="DEBUG", extra_args=["--config", str(conf)]).start(daemon=False)
    monkeypatch.setenv("XENSTORED_PATH", dom0.xenstored.socket_path)     # for the fake xl
    dom0.conf = conf
    conf.write_text("")
    devices(dom0)
    yield dom0
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print("\n----- pcibackd log tail -----\n" + dom0.log_tail(80))
    dom0.stop()


@pytest.fixture
def running(host):
    host.start_daemon()
    return host


def test_hide_at_start_persists_and_remove_rebinds(host):
    host.conf.write_text('[devices]\nhide = ["0000:00:06.*", "0000:02:00.0"]\n')
    host.start_daemon()
    assert set(pool(host)) == {TESTDEV, TESTDEV1, E1000E}
    st = drivers.state(pci_root(host), E1000E)
    assert st["driver"] == "pci-stub" and st["quarantined"]
    saved = json.loads((host.sim_dir / "state" / "pool.json").read_text())
    assert {f["bdf"]: f["driver"] for f in saved["functions"]}[E1000E] == "e1000e"
    assert drivers.state(pci_root(host), EDU)["driver"] == "edu"          # not hidden: untouched

    assert "rebound to e1000e" in ok(host, "assignable-remove", "-r", E1000E)
    st = drivers.state(pci_root(host), E1000E)
    assert st["driver"] == "e1000e" and not st["quarantined"]
    assert "left without a driver" in ok(host, "assignable-remove", TESTDEV1)
    assert drivers.state(pci_root(host), TESTDEV1)["driver"] is None      # no -r: no driver

    host.conf.write_text("")                                               # the pool outlives the daemon
    host.stop_daemon()
    drivers.set_driver(pci_root(host), TESTDEV, "pci-testdev")            # ... and a reboot
    host.start_daemon()
    assert set(pool(host)) == {TESTDEV}
    assert drivers.state(pci_root(host), TESTDEV)["driver"] == "pci-stub"  # taken again at start
    assert ok(host, "assignable-list").split() == [TESTDEV]


def test_hide_of_an_unknown_or_busy_function_is_logged_and_the_daemon_serves(host):
    drivers.set_in_use(pci_root(host), E1000E, "its interface eth0 carries the default route")
    host.conf.write_text('[devices]\nhide = ["0000:09:00.0", "0000:02:00.0", "0000:00:05.0"]\n')
    host.start_daemon()
    assert set(pool(host)) == {EDU}
    log = host.daemon_log.read_text()
    assert "0000:09:00.0" in log and "eth0 carries the default route" in log
    assert drivers.state(pci_root(host), E1000E)["driver"] == "e1000e"


def test_assignable_add_bad_input(running):
    dom0 = running
    drivers.set_in_use(pci_root(dom0), E1000E, "its disk sda is in use (/dev/sda1 is mounted or swap)")
    err = fails(dom0, 1, "assignable-add", E1000E)
    assert E1000E in err and "in use by dom0" in err and "--force" in err
    assert drivers.state(pci_root(dom0), E1000E)["driver"] == "e1000e" and E1000E not in pool(dom0)
    ok(dom0, "assignable-add", "--force", E1000E)
    assert pool(dom0)[E1000E]["bound"] == "pci-stub"

    assert "no PCI function 0000:09:00.0" in fails(dom0, 6, "assignable-add", "0000:09:00.0")
    assert "not a PCI address" in fails(dom0, 2, "assignable-add", "zz:00.0")

    drivers.refuse_stub(pci_root(dom0), EDU)
    err = fails(dom0, 1, "assignable-add", EDU)
    assert EDU in err and "refused to bind" in err
    st = drivers.state(pci_root(dom0), EDU)
    assert st["driver"] == "edu" and not st["quarantined"] and EDU not in pool(dom0)

    ok(dom0, "assignable-add", "-n", "gpu", TESTDEV)
    assert ok(dom0, "assignable-list", "-n").splitlines() == [f"{TESTDEV} gpu", E1000E]
    assert "already used" in fails(dom0, 1, "assignable-add", "-n", "gpu", TESTDEV1)
    assert "not in the assignable pool" in fails(dom0, 6, "assignable-remove", EDU)


def pump(front, until, proc=None):
    def step():
        front.follow(timeout=0.05)
        return until()
    wait_until(step, timeout=20, what=lambda: f"front {front.state()} back {front.backend_state()}")
    if proc is not None:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err)
        return out


def test_attach_detach_list_by_name(running):
    dom0 = running
    for bdf in (EDU, TESTDEV, E1000E):
        ok(dom0, "assignable-add", bdf)
    dom0.create_guest(1, [EDU], name="web")
    front = dom0.frontend(1)
    front.connect()
    proc = ctl(dom0, "pci-attach", "web", f"{E1000E},permissive=1", wait=False)
    out = pump(front, lambda: len(front.devices) == 2 and front.backend_state() == S.Connected, proc)
    assert "hot-plugged" in out
    listing = json.loads(ok(dom0, "--json", "pci-list", "web"))
    assert [d["dev"] for d in listing["devices"]] == [EDU, E1000E]
    assert "permissive=1" in listing["devices"][1]["opts"]
    assert drivers.state(pci_root(dom0), E1000E)["assigned"] == 1
    assert pool(dom0)[E1000E]["held_by"] == 1

    dom0.create_guest(2, [TESTDEV], name="db")
    err = fails(dom0, 1, "pci-attach", "db", E1000E)
    assert E1000E in err and "already assigned to domain 1" in err
    assert "HVM-only" in fails(dom0, 2, "pci-attach", "db", f"{E1000E},msitranslate=1")
    assert "unknown key" in fails(dom0, 2, "pci-attach", "db", f"{E1000E},bogus=1")
    assert "no domain named 'nope'" in fails(dom0, 6, "pci-attach", "nope", E1000E)
    assert "no PCI function 0000:0a:00.0" in fails(dom0, 6, "pci-attach", "2", "0a:00.0,seize=1")
    assert "not attached to domain 2" in fails(dom0, 6, "pci-detach", "db", E1000E)

    proc = ctl(dom0, "pci-detach", "1", E1000E, wait=False)
    pump(front, lambda: len(front.devices) == 1 and front.backend_state() == S.Connected, proc)
    wait_until(lambda: drivers.state(pci_root(dom0), E1000E)["assigned"] is None, what="revoked")
    assert [d["dev"] for d in json.loads(ok(dom0, "--json", "pci-list", "web"))["devices"]] == [EDU]
    assert pool(dom0)[E1000E]["held_by"] is None
    ok(dom0, "pci-attach", "db", E1000E)          # free for another guest (not connected yet: no hot-plug)
    ok(dom0, "pci-detach", "-f", "db", E1000E)
    assert pool(dom0)[E1000E]["held_by"] is None
    # what changed is logged, the reads (pci-attach polls pci-list while it waits) are not
    log = dom0.daemon_log.read_text()
    assert "control: pci-attach domain=db" in log and "control: pci-detach domain=db" in log
    assert "control: pci-list" not in log and "control: assignable-list" not in log


def test_a_function_that_vanishes(running):
    dom0 = running
    ok(dom0, "assignable-add", E1000E)
    dom0.toolstack.create_domain(3, "g3")
    shutil.rmtree(dom0.sim_dir / "pci/sys/bus/pci/devices" / E1000E)
    assert f"no PCI function {E1000E}" in fails(dom0, 6, "pci-attach", "g3", E1000E)
    assert dom0.xs.read(f"{backend_path(3)}/state") is None
    assert "missing from the host" in ok(dom0, "assignable-list")
    assert "gone from the host" in ok(dom0, "assignable-remove", "-r", E1000E)
    assert pool(dom0) == {}


def test_no_attach_while_the_backend_reconfigures(running):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    dom0.toolstack.create_domain(3, "g3")
    dom0.xs.write(f"{backend_path(3)}/state", "7")
    assert "reconfiguring" in fails(dom0, 1, "pci-attach", "g3", EDU)
    assert pool(dom0)[EDU]["held_by"] is None and dom0.xs.read(f"{backend_path(3)}/num_devs") is None


# ------------------------------------------------------------------ create --
CFG = """# an unchanged xl config
name = "g1"
type = "pv"
kernel = "/boot/vmlinuz"
memory = 512
pci = [ '{a}',
        '{b},permissive=1' ]
"""


@pytest.fixture
def xl(running, tmp_path):
    """A fake xl (simdom0.xl) on the simulated xenstored, as pcibackctl create's --xl."""
    path = tmp_path / "xl"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m simdom0.xl \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def domains(dom0) -> dict[str, int]:
    return {dom0.xs.read(f"/local/domain/{d}/name"): int(d) for d in dom0.xs.ls("/local/domain") if d != "0"}


def test_create_attaches_before_unpause_and_destroy_frees(running, xl, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b=f"{E1000E},seize=1"))
    out = ok(dom0, "create", "--xl", xl, str(cfg))
    assert "created with 2 PCI function(s)" in out
    domid = domains(dom0)["g1"]
    assert dom0.xs.read(f"/local/domain/{domid}/sim-paused") is None          # unpaused
    be = backend_path(domid)
    assert [dom0.xs.read(f"{be}/dev-{i}") for i in range(2)] == [EDU, E1000E]
    assert "permissive=1" in dom0.xs.read(f"{be}/opts-1")
    assert pool(dom0)[E1000E]["source"] == "seize"                             # seize=1 joined the pool
    front = dom0.frontend(domid)
    assert len(front.connect()) == 2

    subprocess.run([xl, "destroy", "g1"], check=True, timeout=30)
    wait_until(lambda: all(f["held_by"] is None for f in pool(dom0).values()), what="functions free")
    assert "paused" in ok(dom0, "create", "--xl", xl, str(cfg), "-p")       # the administrator's -p stays
    assert dom0.xs.read(f"/local/domain/{domains(dom0)['g1']}/sim-paused") == "1"
    subprocess.run([xl, "destroy", "g1"], check=True, timeout=30)
    wait_until(lambda: all(f["held_by"] is None for f in pool(dom0).values()), what="functions free")
    wait_until(lambda: all(drivers.state(pci_root(dom0), b)["assigned"] is None for b in (EDU, E1000E)),
               what="grants revoked")
    assert set(pool(dom0)) == {EDU, E1000E}


def test_create_config_syntax_error_names_the_line(running, xl, tmp_path):
    dom0 = running
    cfg = tmp_path / "bad.cfg"
    cfg.write_text('name = "g1"\nmemory = 512\npci = [ "00:05.0" \nvcpus = 2\n')
    err = fails(dom0, 2, "create", "--xl", xl, str(cfg))
    assert f"{cfg}:4:" in err
    cfg.write_text('name = "g1"\n\npci = [ "00:05.0,power_mgmt=1" ]\n')
    err = fails(dom0, 2, "create", "--xl", xl, str(cfg))
    assert f"{cfg}:3:" in err and "HVM-only" in err
    assert "-c" in fails(dom0, 2, "create", "--xl", xl, str(cfg), "-c")
    assert domains(dom0) == {}


def test_create_failure_destroys_the_domain_and_frees_the_pool(running, xl, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b=TESTDEV))                 # TESTDEV is not assignable
    err = fails(dom0, 1, "create", "--xl", xl, str(cfg))
    assert f"{TESTDEV} is not assignable" in err and "destroyed" in err
    assert domains(dom0) == {}
    wait_until(lambda: pool(dom0)[EDU]["held_by"] is None, what="EDU free")
    assert drivers.state(pci_root(dom0), TESTDEV)["driver"] == "pci-testdev"   # untouched


def test_a_domain_that_dies_mid_attach(running, xl, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    ok(dom0, "assignable-add", E1000E)
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b=E1000E))
    drivers.kill_on_give(pci_root(dom0))                        # the domain goes while EDU is given to it
    err = fails(dom0, 1, "create", "--xl", xl, str(cfg))
    assert "died during the attach of 0000:00:05.0" in err
    assert domains(dom0) == {}
    assert dom0.xs.ls("/local/domain/0/backend/pci") == []        # nothing half-written
    assert all(f["held_by"] is None for f in pool(dom0).values())
    assert all(drivers.state(pci_root(dom0), b)["assigned"] is None for b in (EDU, E1000E))
