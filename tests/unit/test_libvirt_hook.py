"""etc/libvirt-hook-libxl run as libvirt runs it (``NAME OP SUBOP -``, the domain XML on stdin)
against a fake pcibackctl that records its calls."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOOK = Path(__file__).resolve().parents[2] / "etc/libvirt-hook-libxl"
XML = """<domain type='xen'><name>web</name><metadata>
  <pcibackd:pci xmlns:pcibackd="urn:pcibackd:pci:1">
    <pcibackd:function spec="0000:03:00.0,permissive=1" managed="yes"/>
    <pcibackd:function spec="04:00.1"/>
    <pcibackd:function spec="0000:05:00.0@3" managed="yes"/>
  </pcibackd:pci>
  <other xmlns="urn:x"/>
</metadata><devices><disk type='file'/></devices></domain>"""
HOSTDEV = """<domain type='xen'><name>web</name><devices>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source>
  </hostdev>
  <hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>
</devices></domain>"""


def run(tmp_path, op, subop, xml=XML, fail_on="", say=""):
    """The hook for ``op subop``; the fake pcibackctl fails (exit 1) on calls containing
    ``fail_on`` and prints ``say``.  Returns the hook's process and the calls made."""
    log = tmp_path / "calls"
    log.unlink(missing_ok=True)
    fake = tmp_path / "pcibackctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                    + (f"case \"$*\" in *'{fail_on}'*) echo 'no such function' >&2; exit 1;; esac\n"
                       if fail_on else "")
                    + (f"echo '{say}'\n" if say else ""))
    fake.chmod(0o755)
    p = subprocess.run([sys.executable, str(HOOK), "web", op, subop, "-"], input=xml, text=True,
                       capture_output=True, env=dict(os.environ, PCIBACKCTL=str(fake)), timeout=60)
    return p, (log.read_text().splitlines() if log.exists() else [])


def test_prepare_makes_the_managed_functions_assignable(tmp_path):
    p, calls = run(tmp_path, "prepare", "begin")
    assert p.returncode == 0, p.stderr
    assert calls == ["assignable-add 0000:03:00.0", "assignable-add 0000:05:00.0"]


def test_a_failed_prepare_gives_back_what_it_took_and_aborts_the_start(tmp_path):
    p, calls = run(tmp_path, "prepare", "begin", fail_on="05:00.0")
    assert p.returncode == 1 and "assignable-add 0000:05:00.0: no such function" in p.stderr
    assert calls == ["assignable-add 0000:03:00.0", "assignable-add 0000:05:00.0",
                     "assignable-remove -r 0000:03:00.0"]
    # one that was assignable already is not given back
    p, calls = run(tmp_path, "prepare", "begin", fail_on="05:00.0", say="0000:03:00.0 is assignable "
                   "(already assignable)")
    assert p.returncode == 1 and calls[-1] == "assignable-add 0000:05:00.0"


def test_a_pci_hostdev_is_refused_before_libvirt_binds_it(tmp_path):
    p, calls = run(tmp_path, "prepare", "begin", xml=HOSTDEV)
    assert p.returncode == 1 and calls == []
    assert "<hostdev> 0000:03:00.0" in p.stderr and "xen-pciback" in p.stderr and "<metadata>" in p.stderr


def test_started_attaches_each_function(tmp_path):
    p, calls = run(tmp_path, "started", "begin")
    assert p.returncode == 0, p.stderr
    assert calls == ["pci-attach web 0000:03:00.0,permissive=1", "pci-attach web 04:00.1",
                     "pci-attach web 0000:05:00.0@3"]


def test_a_failed_attach_fails_the_hook(tmp_path):
    p, calls = run(tmp_path, "started", "begin", fail_on="pci-attach")
    assert p.returncode == 1 and "pci-attach 0000:03:00.0,permissive=1: no such function" in p.stderr
    assert len(calls) == 1
    p, _ = run(tmp_path, "started", "begin", xml="<domain>")
    assert p.returncode == 1 and "domain XML" in p.stderr


def test_release_gives_the_managed_functions_back_to_dom0(tmp_path):
    p, calls = run(tmp_path, "release", "end")
    assert p.returncode == 0, p.stderr
    assert calls == ["assignable-remove -r 0000:03:00.0", "assignable-remove -r 0000:05:00.0"]
    p, calls = run(tmp_path, "release", "end", fail_on="03:00.0")      # reported, never fatal
    assert p.returncode == 0 and "assignable-remove -r 0000:03:00.0: no such function" in p.stderr
    assert len(calls) == 2


def test_other_operations_do_nothing(tmp_path):
    for op, subop in (("start", "begin"), ("stopped", "end"), ("migrate", "begin"), ("reconnect", "begin"),
                      ("prepare", "end"), ("release", "begin")):
        p, calls = run(tmp_path, op, subop, xml=HOSTDEV)
        assert p.returncode == 0 and calls == [], (op, subop, p.stderr)
