"""etc/libvirt-hook-libxl against the daemon on the simulated dom0, in libvirt's order:
prepare (managed functions taken from dom0), the domain created, started (attached),
the domain destroyed, release (managed functions back to their dom0 driver)."""

from __future__ import annotations

import os
import subprocess
import sys

from pcibackd.wire.paths import backend_path
from simdom0 import drivers
from test_lifecycle import E1000E, EDU, ROOT, host, ok, pci_root, pool, running  # noqa: F401 (fixtures)
from waiting import wait_until

HOOK = ROOT / "etc/libvirt-hook-libxl"
XML = f"""<domain type='xen'><name>web</name><metadata>
  <pcibackd:pci xmlns:pcibackd="urn:pcibackd:pci:1">
    <pcibackd:function spec="{E1000E},permissive=1" managed="yes"/>
    <pcibackd:function spec="{EDU}"/>
  </pcibackd:pci></metadata></domain>"""


def hook(dom0, tmp_path, op, subop):
    ctl = tmp_path / "pcibackctl"
    ctl.write_text(f"#!/bin/sh\nexec {sys.executable} -m pcibackd.control.cli --runtime-dir {dom0.runtime} \"$@\"\n")
    ctl.chmod(0o755)
    env = dict(os.environ, PCIBACKCTL=str(ctl), PYTHONPATH=str(ROOT), XENSTORED_PATH=dom0.xenstored.socket_path)
    return subprocess.run([sys.executable, str(HOOK), "web", op, subop, "-"], input=XML, text=True,
                          capture_output=True, env=env, timeout=120)


def test_a_libvirt_domain_through_the_hook(running, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)                  # unmanaged: the administrator's pool
    p = hook(dom0, tmp_path, "prepare", "begin")
    assert p.returncode == 0, p.stderr
    assert drivers.state(pci_root(dom0), E1000E)["driver"] == "pci-stub" and E1000E in pool(dom0)

    dom0.toolstack.create_domain(3, "web")           # libxl creates the domain
    p = hook(dom0, tmp_path, "started", "begin")
    assert p.returncode == 0, p.stderr
    be = backend_path(3)
    assert [dom0.xs.read(f"{be}/dev-{i}") for i in range(2)] == [E1000E, EDU]
    assert "permissive=1" in dom0.xs.read(f"{be}/opts-0")

    assert dom0.toolstack.destroy(3) is True         # libxl tears the domain down
    p = hook(dom0, tmp_path, "release", "end")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert drivers.state(pci_root(dom0), E1000E)["driver"] == "e1000e"      # managed: back with dom0
    wait_until(lambda: pool(dom0).get(EDU, {}).get("held_by") is None, what="EDU free")
    assert set(pool(dom0)) == {EDU}
