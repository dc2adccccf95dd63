"""Least privilege for a worker, applied once its setup is done.

Driver: prctl and capset on the calling process.

After :func:`drop`, a worker keeps uid 0 (its files and sockets are
root-owned) but holds **no capabilities** (effective, permitted, inheritable
and bounding sets cleared) and has ``no_new_privs`` set, so nothing it execs can
regain any.  What it can still reach, and why:

* its xenstore connection (already open) — xenstored treats it as dom0, so a
  compromised worker could still write xenstore nodes: the remaining risk;
* its mapped request page and bound event channel (already open);
* its devices' config files: opened at export (before the drop) and on
  hot-plug.  On a real dom0 sysfs serves reads past the first 64 bytes only to
  an opener holding CAP_SYS_ADMIN, so there the worker keeps that single
  capability (worker.KEEP_CAPS) — a known gap; the planned fix is the
  supervisor opening config files and passing the descriptors (SCM_RIGHTS);
* the runtime directory (root-owned 0700): claims, state snapshots, its pid file;
* the supervisor's ZeroMQ socket.
It can no longer load modules, signal or trace other users' processes,
mount, do raw I/O, bypass file permissions (CAP_DAC_OVERRIDE) or change
host drivers.  Mapping a guest's page after a reconnect uses /dev/xen/gntdev
(root-owned 0600), which needs no capability.
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_LAST_FALLBACK = 40
CAP_SYS_ADMIN = 21


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _CAP_LAST_FALLBACK


def set_no_new_privs() -> None:
    """Nothing this process execs can gain privileges (also what a seccomp filter needs)."""
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop(keep: tuple[int, ...] = (), uid: int | None = None, gid: int | None = None) -> None:
    """Clear the bounding set and all capability sets except ``keep``; set no_new_privs;
    with ``uid``, become that uid and ``gid`` (:func:`become`) in between: after the
    bounding set (clearing it needs CAP_SETPCAP), before the capability sets (switching
    needs CAP_SETUID/CAP_SETGID)."""
    for cap in range(_cap_last() + 1):
        if cap not in keep:
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)     # EINVAL for unknown caps: ignore
    set_no_new_privs()
    if uid is not None:
        become(uid, uid if gid is None else gid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in keep:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


DEFAULT_UID_BASE = 0x70000000     # far above any distribution's static and systemd's dynamic ranges
MAX_DOMID = 0x7FEF                # DOMID_FIRST_RESERVED - 1


def worker_uid(base: int, domid: int) -> int:
    """The uid (and gid) of ``domid``'s worker: ``base + domid``, one per guest, stable across
    its restarts (so a successor reads its predecessor's files and a new supervisor can tell
    its workers apart by the kernel's credentials)."""
    if not 0 <= domid <= MAX_DOMID:
        raise ValueError(f"domid {domid} out of range")
    if not 0 < base <= 0xFFFFFFFE - MAX_DOMID:
        raise ValueError(f"worker uid base {base} out of range")
    return base + domid


def become(uid: int, gid: int) -> None:
    """Switch every id of this process to ``uid``/``gid`` with no supplementary groups.

    Call after everything privileged is open, through :func:`drop`; leaving uid 0 also
    clears the permitted and effective capability sets.  Irreversible: the saved ids
    change too."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError("setresuid/setresgid did not take")


def status(pid: int | None = None) -> dict[str, str]:
    """CapEff/CapPrm/CapBnd/NoNewPrivs of a process (for tests and status)."""
    out = {}
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "NoNewPrivs"):
                out[key] = value.strip()
    return out
