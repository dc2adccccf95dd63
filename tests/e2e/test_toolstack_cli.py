"""`python -m pcibackd.xenstore.toolstack` against a simulated dom0: attach at
creation, hot-plug into a running guest, detach, destroy."""

import subprocess
import sys
import threading

from pcibackd.wire.pciif import XenbusState as S
from pcibackd.wire.paths import backend_path


def ts(dom0, *args):
    return subprocess.run([sys.executable, "-m", "pcibackd.xenstore.toolstack", "--xenstored-path",
                           dom0.xenstored.socket_path, "--state-dir", str(dom0.dir / "ts"), *args],
                          capture_output=True, text=True, timeout=60, env=dom0._env())


def test_cli_attach_hotplug_detach_destroy(dom0):
    dom0.add_device("edu", "0000:00:05.0")
    dom0.add_device("pci-testdev", "0000:00:06.0")
    r = ts(dom0, "attach", "1", "0000:00:05.0")
    assert r.returncode == 1 and "domain 1 does not exist" in r.stderr
    dom0.toolstack.create_domain(1, "cli")
    r = ts(dom0, "attach", "1", "0000:00:05.0")
    assert r.returncode == 0 and "attached as dev-0" in r.stdout
    front = dom0.frontend(1)
    assert len(front.connect()) == 1
    box = {}
    t = threading.Thread(target=lambda: box.update(r=ts(dom0, "attach", "1", "0000:00:06.0")))
    t.start()
    while t.is_alive() or len(front.devices) < 2:
        front.follow(timeout=0.05)
        assert len(front.devices) <= 2
        if not t.is_alive() and box["r"].returncode:
            break
    t.join()
    assert box["r"].returncode == 0, box["r"].stderr
    assert len(front.devices) == 2 and dom0.xs.read(f"{backend_path(1)}/num_devs") == "2"
    t = threading.Thread(target=lambda: box.update(r=ts(dom0, "destroy", "1")))
    t.start()
    while t.is_alive():
        front.follow(timeout=0.05)
    assert box["r"].returncode == 0 and "closed" in box["r"].stdout
    assert dom0.xs.ls(backend_path(1)) == [] and front.state() in (S.Closed, None)


def test_cli_permissions_outside_xen_fail_before_any_node_is_written(dom0):
    import os

    import pytest
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("a real Xen domain: the hypervisor calls would act")
    dom0.add_device("edu", "0000:00:05.0")
    dom0.toolstack.create_domain(1, "cli")
    r = ts(dom0, "attach", "1", "0000:00:05.0", "--permissions")
    ours = [line for line in r.stderr.splitlines() if line.startswith("toolstack: ")]   # libxenctrl adds its own line
    assert r.returncode == 1 and ours, r.stderr
    assert "libxenctrl" in ours[-1] or "xc_interface_open failed" in ours[-1], r.stderr   # the cause, last
    assert dom0.xs.read(f"{backend_path(1)}/num_devs") is None     # no half-attached guest
