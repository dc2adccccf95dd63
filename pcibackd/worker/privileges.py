"""Least privilege for a worker, applied once its setup is done.

Driver: prctl, capset and set*id on the calling process.

A worker is confined in three steps (worker/main.py): Landlock, an empty
bounding set and ``no_new_privs`` before any thread starts (:mod:`.landlock`:
writes only beneath its own state directory and its platform's
grant/event-channel paths; :func:`limit_bounding`), then :func:`drop` (its own
uid and gid, :func:`worker_uid`: ``worker_uid_base + domid``; no
supplementary groups; no capabilities in any set; ``no_new_privs``), then its
seccomp filter (:mod:`.seccomp`).  Everything privileged it needs is open
before the drop: the xenstore connection, the ZeroMQ link (its socket is
reachable by every uid: the supervisor believes only the kernel's pid), the
platform's grant and event-channel handles (``Platform.open_handles`` and one
event-channel handle kept for every ring).  Its devices come later, as
descriptors lent by the supervisor's device gate (:mod:`.devicegate`),
which knows a worker by its pid, not its uid.

What a worker writes lives in ``<runtime>/state/dom<N>/``, which it creates
and gives to its uid in its root prologue (before it reads anything a guest
controls) and its successors reuse: snapshots, the function's seize-time
state, release records and quarantines.  The supervisor reads the records of
every such directory (:mod:`pcibackd.hostpci.records`, never following links
nor blocking on a planted FIFO).  Being neither root nor in any group of
ours, a worker cannot open another worker's state, another function's files,
the status socket (``status_group``, 0660), the control socket, claims, pid
files, the interrupt journal, the fork server's or the xenstore gate's
directories (0600/0700, owned by :data:`LOCKED_UID`), nor signal another
worker or the supervisor, nor connect to xenstored's own socket.

Its xenstore connection is its end of the xenstore gate (daemon/xsgate.py,
xenstore/policy.py): it reads and watches only its own backend and frontend
directories, writes only the backend nodes it owns and its error node, never
a ``dev-N``, ``opts-N``, ``num_devs``, ``frontend`` or a permission, so it
cannot list a free function of the pool for the device gate to lend.

What a worker can still do: in xenstore, write ``state``/``vdev-N``/
``state-N``/``root-N``/``root_num`` and its error node wrongly (its own
guest's device only); read what its Landlock paths allow (/proc, /sys,
Python, libraries); connect to the sockets open to every uid (the device
gate and the worker socket, which believe only the kernel's pid); and
misreport how its own functions' resets went.

The switch needs CAP_CHOWN, CAP_SETUID and CAP_SETGID in the worker's root
prologue, and signalling a worker then needs CAP_KILL in the supervisor
(:data:`FOR_UID_WORKERS`; a service's bounding set must keep them).  A worker
started by a process that is not root (a developer's unprivileged run) keeps
that uid: there is nothing for it to protect.
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


def limit_bounding(keep: tuple[int, ...] = ()) -> None:
    """Clear the bounding set except ``keep`` and set no_new_privs, for this thread and the
    threads it starts later (both are per thread: a worker calls this before its first
    thread, so ZeroMQ's threads have neither).  The capabilities held now stay."""
    for cap in range(_cap_last() + 1):
        if cap not in keep:
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)     # EINVAL for unknown caps: ignore
    set_no_new_privs()


def drop(keep: tuple[int, ...] = (), uid: int | None = None, gid: int | None = None) -> None:
    """Clear the bounding set and all capability sets except ``keep``; set no_new_privs;
    with ``uid``, become that uid and ``gid`` (:func:`become`) in between: after the
    bounding set (clearing it needs CAP_SETPCAP), before the capability sets (switching
    needs CAP_SETUID/CAP_SETGID).  The switch reaches every thread (glibc applies set*id
    to all); the bounding set and no_new_privs only this one (:func:`limit_bounding`)."""
    limit_bounding(keep)
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
FIRST_FREE_UID = 0x10000          # below: system, regular and systemd's dynamic users (and nobody)


def check_uid_base(base: int) -> int:
    """``base`` if ``base .. base + MAX_DOMID`` is a usable range of worker uids (and gids):
    above every user a distribution or systemd hands out, below the invalid id -1, and
    without :data:`LOCKED_UID`; ValueError otherwise."""
    if type(base) is not int or not FIRST_FREE_UID <= base <= 0xFFFFFFFE - MAX_DOMID:
        raise ValueError(f"must be an integer from {FIRST_FREE_UID:#x} to {0xFFFFFFFE - MAX_DOMID:#x}, "
                         f"not {base!r}")
    if base <= LOCKED_UID <= base + MAX_DOMID:
        raise ValueError(f"the range {base:#x}..{base + MAX_DOMID:#x} holds the locked uid {LOCKED_UID:#x}")
    return base


def worker_uid(base: int, domid: int) -> int:
    """The uid (and gid) of ``domid``'s worker: ``base + domid``, one per guest, stable across
    its restarts (so a successor reads its predecessor's files and a new supervisor can tell
    its workers apart by the kernel's credentials)."""
    if type(domid) is not int or not 0 <= domid <= MAX_DOMID:
        raise ValueError(f"domid {domid} out of range")
    return check_uid_base(base) + domid


def in_worker_range(base: int, some_id: int) -> bool:
    """Whether uid or gid ``some_id`` belongs to a worker of the range starting at ``base``."""
    return base <= some_id <= base + MAX_DOMID


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


CAPABILITY_NUMBERS = {"CAP_CHOWN": 0, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8}
# What a root supervisor needs for workers under uids of their own: the worker's root prologue gives
# it its state directory (CHOWN) and switches ids (SETUID/SETGID); the supervisor signals it (KILL).
FOR_UID_WORKERS = ("CAP_CHOWN", "CAP_KILL", "CAP_SETGID", "CAP_SETUID")


def missing(names: tuple[str, ...] = FOR_UID_WORKERS) -> list[str]:
    """Those of ``names`` (keys of :data:`CAPABILITY_NUMBERS`) this process's effective set lacks."""
    effective = int(status()["CapEff"], 16)
    return [n for n in names if not effective >> CAPABILITY_NUMBERS[n] & 1]


def status(pid: int | None = None) -> dict[str, str]:
    """CapEff/CapPrm/CapBnd/NoNewPrivs of a process (for tests and status)."""
    out = {}
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "NoNewPrivs"):
                out[key] = value.strip()
    return out
