"""xenlane/sandbox.py, the checks the Xen lane runs on the unit's daemon under a
real systemd: every option of the shipped unit has one, and each fails on a
process that runs without the sandbox (the passing side runs against a real
systemd in tests/e2e/test_systemd_unit.py and on a real dom0 in the lane)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "xenlane"))
import sandbox  # noqa: E402

UNIT = REPO / "etc" / "pcibackd.service"

# a root process of the host: no namespace of its own, every capability, no filter
PLAIN_MOUNTS = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:3 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
26 22 0:24 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
27 22 0:25 / /tmp rw,nosuid,nodev shared:6 - tmpfs tmpfs rw
"""


def _plain() -> sandbox.Evidence:
    ns = {"mnt": "mnt:[1]", "uts": "uts:[2]"}
    return sandbox.Evidence(
        status={"NoNewPrivs": "0", "Seccomp": "0", "Seccomp_filters": "0", "Umask": "0022",
                "CapBnd": f"{(1 << len(sandbox.CAPS)) - 1:016x}"},
        mounts=sandbox.parse_mountinfo(PLAIN_MOUNTS), limits="Max open files 1024 524288 files\n",
        ns=ns, init_ns=dict(ns), fds=["/dev/null"], show={"TasksMax": "infinity"},
        modes={"/run/pcibackd": 0o755, "/var/lib/pcibackd": 0o755})


def test_every_option_of_the_shipped_unit_has_a_check():
    rows = sandbox.check_all(sandbox.unit_options(UNIT), _plain())
    unchecked = [r for r in rows if "no check for this option" in r[2]]
    assert not unchecked, unchecked
    assert len(rows) >= 25, [r[0] for r in rows]


def test_each_check_fails_on_a_process_without_the_sandbox():
    rows = sandbox.check_all(sandbox.unit_options(UNIT), _plain())
    passed = [r for r in rows if r[1] == "PASS"]
    assert not passed, passed


def test_an_option_nobody_checks_fails():
    rows = sandbox.check_all([("ProtectKernelTunables", "yes"), ("ExecStart", "/bin/true")], _plain())
    assert rows == [("unit-ProtectKernelTunables", "FAIL",
                     "ProtectKernelTunables=yes: no check for this option (xenlane/sandbox.py)")]


def test_the_device_filter_is_shown_by_the_xen_files_held_open():
    ev = _plain()
    ev.fds = ["/xen/privcmd", "/dev/null"]          # as another mount namespace's file reads
    assert sandbox.check_all([("DevicePolicy", "closed")], ev)[0][1] == "PASS"
    ev.fds = ["/dev/null", "/tmp/xen/privcmdx"]
    assert sandbox.check_all([("DevicePolicy", "closed")], ev)[0][1] == "FAIL"


def test_the_last_mount_on_a_path_decides():
    text = PLAIN_MOUNTS + ("40 22 254:0 / / ro,relatime - ext4 /dev/vda rw\n"
                           "41 40 0:30 /systemd-private-x/tmp /tmp rw - tmpfs tmpfs rw\n"
                           "42 40 0:31 / /run/pcibackd rw - tmpfs tmpfs rw\n")
    ev = sandbox.Evidence(status={}, mounts=sandbox.parse_mountinfo(text))
    assert "ro" in ev.mount_of("/usr/lib").options
    assert ev.mount_of("/tmp/x").root == "/systemd-private-x/tmp"
    assert "rw" in ev.mount_of("/run/pcibackd/control.sock").options
    assert ev.mount_of("/run/pcibackdx").point == "/run"
