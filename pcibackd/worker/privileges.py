"""Least privilege for a worker, applied once its setup is done.

Driver: prctl, capset and set*id on the calling process.

A worker is confined in three steps (worker/main.py): Landlock before any
thread starts (:mod:`.landlock`: writes only beneath its runtime state and its
platform's grant/event-channel paths), then :func:`drop` (no capabilities in
any set, ``no_new_privs``), then its seccomp filter (:mod:`.seccomp`).  It
opens no host device file itself: the supervisor's device gate
(:mod:`.devicegate`) lends it the descriptors of the functions listed in its
own backend, and sysfs serves a whole config space through a descriptor its
root opener made, so no worker keeps CAP_SYS_ADMIN on Xen.  Its messages on
the worker socket count only from its own pid (the kernel's credentials).

A worker keeps uid 0.  Without CAP_DAC_OVERRIDE that still opens every
root-owned file whose owner bits allow it, so what only the supervisor and
root administrators may reach is owned by :data:`LOCKED_UID` (:func:`lock_away`):
the control socket, claims, pid files, the interrupt journal, the fork
server's and the xenstore gate's directories.  Its xenstore connection is its
end of the xenstore gate (daemon/xsgate.py, xenstore/policy.py): it reads and
watches only its own backend and frontend directories, writes only the
backend nodes it owns and its error node, never a ``dev-N``, ``opts-N``,
``num_devs``, ``frontend`` or a permission, so it cannot list a free function
of the pool for the device gate to lend.  What a worker can still do: in
xenstore, within its own guest, write ``state``/``vdev-N``/``state-N``/
``root-N``/``root_num`` and its error node wrongly (its own guest's device
only); read what its Landlock paths allow (/proc, /sys, Python, libraries),
write the shared runtime state (other guests' snapshots, release records),
and connect to unix sockets root owns with owner access (Landlock does not
mediate connects) — among them xenstored's own socket, around the gate, for as
long as it keeps uid 0.

:func:`drop` can also switch to a uid of the worker's own (:func:`worker_uid`:
``base + domid``), which closes the rest (tests/e2e/test_worker_uid.py); a
worker does not use it yet: after setup it still maps grants and opens event
channels by path (/dev/xen, the simulation's files) and writes snapshots and
release records under the root-owned runtime directory; those must first
become descriptors or supervisor work.  Under its own uid it cannot connect to
xenstored's socket (mode 0600/0755, root's), so the gate is then its only way
to xenstore (tests/e2e/test_xenstore_gate.py).
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


LOCKED_UID = DEFAULT_UID_BASE - 1     # owns what only CAP_DAC_OVERRIDE may reach; no process runs as it


def lock_away(path) -> bool:
    """Give ``path`` (mode 0600/0700) to :data:`LOCKED_UID`: the supervisor and root
    administrators (CAP_DAC_OVERRIDE) still reach it, a worker (uid 0, no capabilities) no
    longer does.  False when this process may not chown (not root: nothing to protect from)."""
    try:
        os.chown(path, LOCKED_UID, LOCKED_UID, follow_symlinks=False)
    except PermissionError:
        return False
    return True


def status(pid: int | None = None) -> dict[str, str]:
    """CapEff/CapPrm/CapBnd/NoNewPrivs of a process (for tests and status)."""
    out = {}
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "NoNewPrivs"):
                out[key] = value.strip()
    return out
