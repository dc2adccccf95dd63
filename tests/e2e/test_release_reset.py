"""A function leaving its guest through the daemon: its reset is reported by
``pcibackctl devices``, and one whose reset failed goes to no other guest until
``pcibackctl quarantine clear --force``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import backend_path, error_path
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.xenstore.toolstack import wait_for_value
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
NVME, E1000E = "0000:00:0a.0", "0000:00:0b.0"
G0 = BDF(0, 0, 0, 0)


def ctl(dom0, *argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pcibackd.control.cli", "--runtime-dir", str(dom0.runtime), *argv],
                          capture_output=True, text=True, timeout=30, env=env)


def devices(dom0) -> dict[str, dict]:
    p = ctl(dom0, "devices", "--json")
    assert p.returncode == 0, p.stderr
    return {d["bdf"]: d for d in json.loads(p.stdout)}


def test_failed_reset_quarantines_until_force_clears(dom0):
    nvme = dom0.add_device("nvme", NVME)
    dom0.add_device("e1000e", E1000E)
    dom0.create_guest(1, [NVME, E1000E])
    front = dom0.frontend(1)
    front.connect()
    assert front.conf_write(G0, 0x04, 2, 0x0107) == Err.success     # the guest's driver: bus master
    nvme.fail_resets("error")
    assert dom0.toolstack.destroy(1) is True
    wait_until(lambda: dom0.guest_status(1) is None, what="dom1's worker gone")

    listed = devices(dom0)
    assert (listed[NVME]["reset"]["method"], listed[NVME]["reset"]["result"], listed[NVME]["quarantined"]) == \
        ("flr", "failed", True)
    assert (listed[E1000E]["reset"]["method"], listed[E1000E]["reset"]["result"], listed[E1000E]["quarantined"]) == \
        ("pm", "ok", False)
    assert not nvme.read(0x04, 2) & 0x4                          # restored anyway: no DMA
    table = [line.split() for line in ctl(dom0, "devices").stdout.splitlines()]
    assert [NVME, "-", "flr", "failed", "yes"] in table
    assert "quarantined" in dom0.log_tail(200)

    nvme.fail_resets(None)
    dom0.create_guest(2, [NVME])                                 # the next guest: refused
    wait_for_value(dom0.xs, f"{backend_path(2)}/state", str(int(S.Closing)), 10)
    assert "quarantined" in dom0.xs.read(error_path(2))

    refused = ctl(dom0, "quarantine", "clear", NVME)
    assert refused.returncode == 2 and "--force" in refused.stderr
    cleared = ctl(dom0, "quarantine", "clear", "--force", NVME)
    assert cleared.returncode == 0, cleared.stderr
    assert not devices(dom0)[NVME]["quarantined"]
    assert ctl(dom0, "quarantine", "clear", "--force", NVME).returncode == 6

    dom0.create_guest(3, [NVME])                                 # handed out again
    third = dom0.frontend(3)
    third.connect()
    assert third.conf_read(G0, 0, 2) == (Err.success, 0x1B36)
