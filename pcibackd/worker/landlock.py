"""A Landlock ruleset for a worker once its setup is done: which paths it may still open.

Driver: the landlock_* system calls on the calling thread and the threads it
starts later (so a worker applies it first thing, before its xenstore and
ZeroMQ threads exist).

A worker runs as a uid of its own, so file modes keep it from root's files;
Landlock narrows what it may reach further, by path (a worker started without
a uid, as root without capabilities, would otherwise still write every
root-owned file):

* reading only beneath the paths given (Python's own, shared libraries, /sys,
  /proc, the policy file, its state, the platform's paths): not /etc/shadow,
  not other users' homes;
* writing, creating and removing files only beneath the directories given
  (its own state directory, the platform's grant and event-channel paths);
* device ioctls only on the device paths given (``/dev/xen``);
* no ptrace (nor /proc/PID/mem) of a process outside its own ruleset, and with
  ABI 6 or later no signal to one (other workers, the supervisor).

Unix socket connects are not path accesses for Landlock: sockets only root
with CAP_DAC_OVERRIDE should reach are kept from workers by ownership
(:func:`pcibackd.worker.privileges.lock_away`).  A kernel without Landlock
leaves the worker unrestricted by path (:func:`restrict` returns 0).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from pathlib import Path

_NR_CREATE_RULESET, _NR_ADD_RULE, _NR_RESTRICT_SELF = 444, 445, 446     # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
SCOPE_SIGNAL = 1 << 1

_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}   # 5 and later: all 16
READ = READ_FILE | READ_DIR
WRITE = READ | WRITE_FILE | MAKE_REG | MAKE_DIR | REMOVE_FILE | REMOVE_DIR | TRUNCATE | REFER
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    version = _libc.syscall(ctypes.c_long(_NR_CREATE_RULESET), None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, version)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def restrict(readable: tuple[Path, ...] = (Path("/"),), writable: tuple[Path, ...] = (),
             devices: tuple[Path, ...] = ()) -> int:
    """Confine this process as described in the module docstring; the ABI used (0: no Landlock).

    Paths that do not exist are skipped.  ``no_new_privs`` must be set already."""
    version = abi()
    if version < 1:
        return 0
    handled = _BY_ABI.get(version, (1 << 16) - 1)
    if version >= 6:
        attr = struct.pack("<QQQ", handled, 0, SCOPE_SIGNAL)
    elif version >= 4:
        attr = struct.pack("<QQ", handled, 0)
    else:
        attr = struct.pack("<Q", handled)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(ctypes.c_long(_NR_CREATE_RULESET), buf, ctypes.c_size_t(len(attr)),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        rules = [(p, READ) for p in readable] + [(p, WRITE) for p in writable] + [(p, DEVICE) for p in devices]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FILE_RIGHTS       # a rule on a file takes only rights a file has
                rule = ctypes.create_string_buffer(struct.pack("<Qi", access & handled, fd), 12)
                _check(_libc.syscall(ctypes.c_long(_NR_ADD_RULE), ctypes.c_int(ruleset),
                                     ctypes.c_int(_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(_libc.syscall(ctypes.c_long(_NR_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return version
