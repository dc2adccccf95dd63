"""Each hardening option of a service unit, checked on the running service
(stdlib only): what the kernel shows of the main process (/proc/PID/status,
mountinfo, limits, namespaces, open files) against what the unit asks.

    sandbox.py UNIT PID INIT_PID SHOW_FILE
        PID: the service's main process; INIT_PID: the systemd that runs it (its
        namespaces are the reference, its root holds the unit's directories);
        SHOW_FILE: ``systemctl show UNIT`` output; UNIT.d/*.conf are read too.
        Prints "unit-<option> PASS|FAIL <detail>" per option, exit 0.

Every option of the unit's [Service] section is either in CHECKS (evidence the
kernel shows), in SYSTEMD_SIDE (seccomp and device filters: systemd applied them,
the kernel shows that filters exist and systemd's property echo says which), or
in NOT_HARDENING; an option in none of them fails, so a new option needs a check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unitfile import section  # noqa: E402

# Linux capability numbers (include/uapi/linux/capability.h), by name.
CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
        "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
        "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
        "PERFMON BPF CHECKPOINT_RESTORE").split()
CAP_BIT = {f"CAP_{name}": i for i, name in enumerate(CAPS)}


@dataclass
class Mount:
    point: str
    root: str
    options: set[str]
    fstype: str
    superoptions: set[str]


@dataclass
class Evidence:
    """What the kernel shows of the service's main process, and systemd's echo."""
    status: dict[str, str]
    mounts: list[Mount]
    limits: str = ""
    ns: dict[str, str] = field(default_factory=dict)           # namespace -> link, the service's
    init_ns: dict[str, str] = field(default_factory=dict)      # and systemd's
    fds: list[str] = field(default_factory=list)               # readlink of each open fd
    show: dict[str, str] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)        # directory -> permission bits
    absent: set[str] = field(default_factory=set)              # COVERED paths the service's root lacks

    def mount_of(self, path: str) -> Mount | None:
        """The mount a path resolves to: the last one mounted on its longest prefix."""
        best = None
        for m in self.mounts:
            if path == m.point or path.startswith(m.point.rstrip("/") + "/") or m.point == "/":
                if best is None or len(m.point) >= len(best.point):
                    best = m
        return best

    def capbnd(self) -> int:
        return int(self.status.get("CapBnd", "0"), 16)

    def seccomp(self) -> str:
        return f"seccomp mode {self.status.get('Seccomp', '?')}, {self.status.get('Seccomp_filters', '?')} filters"


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/PID/mountinfo lines, in mount order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 6 or len(r) < 2:
            continue
        mounts.append(Mount(_unescape(f[4]), _unescape(f[3]), set(f[5].split(",")), r[0],
                            set(r[2].split(",")) if len(r) > 2 else set()))
    return mounts


def parse_status(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


# ---------------------------------------------------------------- evidence --
Verdict = tuple[bool, str]
Check = Callable[[str, Evidence], Verdict]      # (the option's value, the evidence)


def _ro(ev: Evidence, *paths: str) -> Verdict:
    bad = [p for p in paths if ev.mount_of(p) is None or "ro" not in ev.mount_of(p).options]
    return not bad, (f"read-only: {' '.join(paths)}" if not bad else f"writable: {' '.join(bad)}")


def _covered(ev: Evidence, *paths: str) -> Verdict:
    """A mount on each path itself (an inaccessible node, or an empty tmpfs), or no such path."""
    bad = [p for p in paths if p not in ev.absent and (ev.mount_of(p) is None or ev.mount_of(p).point != p)]
    seen = [f"{p} ({'absent' if p in ev.absent else ev.mount_of(p).fstype})" for p in paths if p not in bad]
    return not bad, (f"covered: {' '.join(seen)}" if not bad else f"not covered: {' '.join(bad)}")


def _caps_dropped(ev: Evidence, *names: str) -> Verdict:
    kept = [n for n in names if ev.capbnd() >> CAP_BIT[n] & 1]
    return not kept, (f"not in CapBnd: {' '.join(names)}" if not kept else f"still in CapBnd: {' '.join(kept)}")


def _both(a: Verdict, b: Verdict) -> Verdict:
    return a[0] and b[0], f"{a[1]}; {b[1]}"


def _protect_system(value: str, ev: Evidence) -> Verdict:
    paths = {"yes": ("/usr", "/boot"), "full": ("/usr", "/boot", "/etc"),
             "strict": ("/", "/usr", "/etc", "/var")}.get(value, ())
    ok, detail = _ro(ev, *paths)
    writable = [p for p in ("/run/pcibackd", "/var/lib/pcibackd")
                if ev.mount_of(p) is not None and "ro" not in ev.mount_of(p).options]
    return ok and bool(paths), f"{detail}; writable: {' '.join(writable) or 'none'}"


def _private_tmp(value: str, ev: Evidence) -> Verdict:
    bad = [p for p in ("/tmp", "/var/tmp") if ev.mount_of(p) is None or "systemd-private-" not in ev.mount_of(p).root]
    return not bad, ("/tmp and /var/tmp are the service's own" if not bad else f"shared: {' '.join(bad)}")


def _ns(kind: str) -> Check:
    def check(value: str, ev: Evidence) -> Verdict:
        own, init = ev.ns.get(kind), ev.init_ns.get(kind)
        return bool(own) and own != init, f"{kind} namespace {own} (systemd's {init})"
    return check


def _protect_proc(value: str, ev: Evidence) -> Verdict:
    m = ev.mount_of("/proc")
    opts = (m.options | m.superoptions) if m else set()
    want = f"hidepid={value}"
    return want in opts, f"/proc mounted with {','.join(sorted(o for o in opts if o.startswith(('hidepid', 'subset')))) or 'no hidepid'}"


def _bounding(value: str, ev: Evidence) -> Verdict:
    names = value.lstrip("~").split()
    inverted = value.startswith("~")
    present = [n for n in names if ev.capbnd() >> CAP_BIT[n] & 1]
    ok = not present if inverted else len(present) == len(names)
    return ok, f"CapBnd {ev.status.get('CapBnd')}: " + (f"{len(names) - len(present)} of {len(names)} dropped"
                                                        if inverted else f"{len(present)} of {len(names)} kept")


def _status_is(key: str, want: str) -> Check:
    def check(value: str, ev: Evidence) -> Verdict:
        return ev.status.get(key) == want, f"{key}: {ev.status.get(key)}"
    return check


def _limit_nofile(value: str, ev: Evidence) -> Verdict:
    line = next((ln for ln in ev.limits.splitlines() if ln.startswith("Max open files")), "")
    return value in line.split(), " ".join(line.split())


def _mode(path: str) -> Check:
    def check(value: str, ev: Evidence) -> Verdict:
        got = ev.modes.get(path)
        return got == int(value, 8), f"{path} mode {got:04o}" if got is not None else f"{path} missing"
    return check


def _devices(value: str, ev: Evidence) -> Verdict:
    # a file of another mount namespace may read as "/xen/privcmd" rather than "/dev/xen/privcmd"
    xen = sorted({f for f in ev.fds if "/xen/" in f and f.rsplit("/", 1)[-1] in XEN_DEVICES})
    return bool(xen), f"systemd: DevicePolicy={ev.show.get('DevicePolicy')} DeviceAllow={ev.show.get('DeviceAllow')}; " \
                      f"open: {' '.join(xen) or 'no /dev/xen file'}"


def _tasks(value: str, ev: Evidence) -> Verdict:
    return ev.show.get("TasksMax") == value, f"systemd: TasksMax={ev.show.get('TasksMax')}"


# the character devices a Xen backend opens (misc devices: DeviceAllow=char-misc)
XEN_DEVICES = ("privcmd", "evtchn", "gntdev", "gntalloc", "xenbus", "xenbus_backend", "hypercall")
# paths an option hides (the check accepts a path the system does not have)
COVERED = ("/home", "/root", "/usr/lib/modules", "/proc/kmsg")
# option -> check(value, evidence): what the kernel shows for it
CHECKS: dict[str, Check] = {
    "NoNewPrivileges": _status_is("NoNewPrivs", "1"),
    "ProtectSystem": _protect_system,
    "ProtectHome": lambda v, ev: _covered(ev, "/home", "/root"),
    "PrivateTmp": _private_tmp,
    "ProtectKernelModules": lambda v, ev: _both(_covered(ev, "/usr/lib/modules"), _caps_dropped(ev, "CAP_SYS_MODULE")),
    "ProtectKernelLogs": lambda v, ev: _both(_covered(ev, "/proc/kmsg"), _caps_dropped(ev, "CAP_SYSLOG")),
    "ProtectControlGroups": lambda v, ev: _ro(ev, "/sys/fs/cgroup"),
    "ProtectClock": lambda v, ev: _caps_dropped(ev, "CAP_SYS_TIME", "CAP_WAKE_ALARM"),
    "ProtectHostname": _ns("uts"),
    "PrivateMounts": _ns("mnt"),
    "ProtectProc": _protect_proc,
    "UMask": lambda v, ev: (ev.status.get("Umask") == v.zfill(4), f"Umask: {ev.status.get('Umask')}"),
    "CapabilityBoundingSet": _bounding,
    "LimitNOFILE": _limit_nofile,
    "TasksMax": _tasks,
    "DevicePolicy": _devices,
    "DeviceAllow": _devices,
    "RuntimeDirectoryMode": _mode("/run/pcibackd"),
    "StateDirectoryMode": _mode("/var/lib/pcibackd"),
}
# seccomp filters systemd installs: the kernel shows that they are there, systemd's echo which
SYSTEMD_SIDE = ("SystemCallFilter", "SystemCallErrorNumber", "SystemCallArchitectures", "SystemCallLog",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality",
                "RestrictAddressFamilies", "MemoryDenyWriteExecute")
# checked elsewhere in the lane (start, notify, watchdog, reload, stop) or not a restriction
NOT_HARDENING = ("Type", "NotifyAccess", "ExecStartPre", "ExecStart", "ExecReload", "KillMode", "TimeoutStopSec",
                 "TimeoutStartSec", "Restart", "RestartSec", "WatchdogSec", "RuntimeDirectory",
                 "RuntimeDirectoryPreserve", "StateDirectory", "Environment", "EnvironmentFile",
                 "BindReadOnlyPaths")


def unit_options(unit: Path) -> list[tuple[str, str]]:
    """The [Service] options of a unit file and its drop-ins (UNIT.d/*.conf), in order."""
    options = section(unit.read_text(), "Service")
    for dropin in sorted(unit.with_name(unit.name + ".d").glob("*.conf")):
        options += section(dropin.read_text(), "Service")
    return options


def check_all(options: list[tuple[str, str]], ev: Evidence) -> list[tuple[str, str, str]]:
    """``(option, PASS|FAIL, detail)`` for each hardening option (the last value of each)."""
    last = {}
    for key, value in options:
        last[key] = value
    out = []
    for key, value in last.items():
        if key in NOT_HARDENING:
            continue
        if key in CHECKS:
            try:
                ok, detail = CHECKS[key](value, ev)
            except (KeyError, ValueError) as exc:
                ok, detail = False, f"cannot tell: {exc!r}"
        elif key in SYSTEMD_SIDE:
            echo = ev.show.get(key, "(not shown)")
            ok = ev.status.get("Seccomp") == "2" and key in ev.show
            detail = f"{ev.seccomp()}; systemd: {key}={echo[:100]}{'...' if len(echo) > 100 else ''}"
        else:
            ok, detail = False, "no check for this option (xenlane/sandbox.py)"
        out.append((f"unit-{key}", "PASS" if ok else "FAIL", f"{key}={value}: {detail}"))
    return out


# ---------------------------------------------------------------- driver --
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _links(pid: int, sub: str) -> dict[str, str]:
    out = {}
    base = f"/proc/{pid}/{sub}"
    for name in os.listdir(base) if os.path.isdir(base) else ():
        try:
            out[name] = os.readlink(f"{base}/{name}")
        except OSError:
            pass
    return out


def gather(pid: int, init_pid: int, show_text: str) -> Evidence:
    """The evidence of ``pid``, run by the systemd ``init_pid`` (pids as this namespace sees them)."""
    modes = {}
    for path in ("/run/pcibackd", "/var/lib/pcibackd"):
        try:
            modes[path] = os.stat(f"/proc/{init_pid}/root{path}").st_mode & 0o7777
        except OSError:
            pass
    show = dict(line.split("=", 1) for line in show_text.splitlines() if "=" in line)
    absent = {p for p in COVERED if not os.path.lexists(f"/proc/{pid}/root{p}")}
    return Evidence(status=parse_status(_read(f"/proc/{pid}/status")),
                    mounts=parse_mountinfo(_read(f"/proc/{pid}/mountinfo")), limits=_read(f"/proc/{pid}/limits"),
                    ns=_links(pid, "ns"), init_ns=_links(init_pid, "ns"), fds=list(_links(pid, "fd").values()),
                    show=show, modes=modes, absent=absent)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    unit, pid, init_pid, show_file = argv
    ev = gather(int(pid), int(init_pid), Path(show_file).read_text())
    if not ev.status:
        print(f"unit-sandbox FAIL no /proc/{pid}/status (the service is gone)")
        return 0
    for check, verdict, detail in check_all(unit_options(Path(unit)), ev):
        print(check, verdict, detail)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
