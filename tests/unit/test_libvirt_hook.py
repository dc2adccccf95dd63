"""etc/libvirt-hook-libxl: which pcibackctl calls libvirt's "started" hook makes (a fake pcibackctl)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOOK = Path(__file__).resolve().parents[2] / "etc/libvirt-hook-libxl"
XML = """<domain type='xen'><name>web</name><metadata>
  <pcibackd:pci xmlns:pcibackd="urn:pcibackd:pci:1">
    <pcibackd:function spec="0000:03:00.0,permissive=1"/>
    <pcibackd:function spec="04:00.1"/>
  </pcibackd:pci>
  <other xmlns="urn:x"/>
</metadata></domain>"""


def run(tmp_path, op, xml=XML, fail=False):
    log = tmp_path / "calls"
    fake = tmp_path / "pcibackctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n" + ("echo 'no such function' >&2; exit 1\n" if fail else ""))
    fake.chmod(0o755)
    p = subprocess.run([sys.executable, str(HOOK), "web", op, "begin", "-"], input=xml, text=True,
                       capture_output=True, env=dict(os.environ, PCIBACKCTL=str(fake)))
    return p, (log.read_text().splitlines() if log.exists() else [])


def test_started_attaches_each_function(tmp_path):
    p, calls = run(tmp_path, "started")
    assert p.returncode == 0, p.stderr
    assert calls == ["pci-attach web 0000:03:00.0,permissive=1", "pci-attach web 04:00.1"]


def test_other_operations_do_nothing(tmp_path):
    for op in ("prepare", "start", "stopped", "release"):
        p, calls = run(tmp_path, op)
        assert p.returncode == 0 and calls == []


def test_a_failed_attach_fails_the_hook(tmp_path):
    p, calls = run(tmp_path, "started", fail=True)
    assert p.returncode == 1 and "no such function" in p.stderr and len(calls) == 1
    p, _ = run(tmp_path, "started", xml="<domain>")
    assert p.returncode == 1 and "domain XML" in p.stderr
