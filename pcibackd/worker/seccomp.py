"""A seccomp filter for a worker once its setup is done (classic BPF through seccomp(2)).

Driver: the seccomp(2) system call on the calling process (every thread).

The filter denies what the op loop never needs and what a guest that took
over its worker would reach for first: running programs (execve, execveat),
new processes (fork, vfork, clone without CLONE_THREAD; clone3 gets ENOSYS
so libc falls back to clone), tracing and reading other processes' memory,
mounts and namespaces, kernel modules, kexec, bpf, perf events, keyrings,
swap, reboot, raw port I/O, handles to arbitrary files (open_by_handle_at),
and sockets other than unix ones (ZeroMQ's ipc reconnect and the device gate
use AF_UNIX).  Denied calls fail with EPERM; a syscall made through another
ABI (32-bit or x32 entry on x86-64) kills the process, as a denylist would
otherwise be bypassed there.

The filter is installed with SECCOMP_FILTER_FLAG_TSYNC, so the threads
already running (ZeroMQ's I/O thread, the xenstore router) are filtered
too, not only the calling thread and its later children.  Files are not
filtered by path (BPF cannot read a path): what a worker may open is decided
by its uid and the modes of the files (see :mod:`.privileges`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket

_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_NR_SECCOMP = {"x86_64": 317, "aarch64": 277}
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_LD_W_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_JSET = 0x45
_RET = 0x06
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16        # struct seccomp_data (arg0's low word: little-endian)
_X32_BIT = 0x40000000
CLONE_THREAD = 0x00010000

_COMMON = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
           "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442}

# name -> number, per architecture: (AUDIT_ARCH_*, denied calls, socket, clone, clone3)
_X86_64 = {"execve": 59, "execveat": 322, "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
           "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
           "unshare": 272, "setns": 308, "init_module": 175, "finit_module": 313, "delete_module": 176,
           "kexec_load": 246, "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "keyctl": 250,
           "add_key": 248, "request_key": 249, "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172,
           "ioperm": 173, "acct": 163, "open_by_handle_at": 304, "name_to_handle_at": 303,
           "userfaultfd": 323, "settimeofday": 164, "clock_settime": 227, **_COMMON}
_AARCH64 = {"execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
            "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
            "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
            "kexec_file_load": 294, "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217,
            "request_key": 218, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
            "open_by_handle_at": 265, "name_to_handle_at": 264, "userfaultfd": 282, "settimeofday": 170,
            "clock_settime": 112, **_COMMON}
ARCHES = {
    "x86_64": (0xC000003E, _X86_64, 41, 56, 435),
    "aarch64": (0xC00000B7, _AARCH64, 198, 220, 435),
}


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def build(machine: str | None = None) -> list[tuple[int, int | str, int | str, int]]:
    """The filter as (code, jt, jf, k) with jump targets resolved (NotImplementedError: unknown arch)."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        raise NotImplementedError(f"no seccomp syscall table for {machine}")
    arch, denied, nr_socket, nr_clone, nr_clone3 = ARCHES[machine]
    # (code, jt label or 0, jf label or 0, k); labels resolved below
    prog: list = [(_LD_W_ABS, 0, 0, _OFF_ARCH), (_JEQ, 1, 0, arch), (_RET, 0, 0, _RET_KILL_PROCESS),
                  (_LD_W_ABS, 0, 0, _OFF_NR)]
    if machine == "x86_64":
        prog.append((_JGE, "kill", 0, _X32_BIT))
    prog += [(_JEQ, "deny", 0, nr) for nr in sorted(set(denied.values()))]
    prog += [(_JEQ, "nosys", 0, nr_clone3), (_JEQ, "socket", 0, nr_socket), (_JEQ, "clone", 0, nr_clone),
             (_RET, 0, 0, _RET_ALLOW)]
    labels = {}
    for name, body in (("deny", [(_RET, 0, 0, _RET_ERRNO | errno.EPERM)]),
                       ("nosys", [(_RET, 0, 0, _RET_ERRNO | errno.ENOSYS)]),
                       ("kill", [(_RET, 0, 0, _RET_KILL_PROCESS)]),
                       ("socket", [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JEQ, "allow", 0, socket.AF_UNIX),
                                   (_RET, 0, 0, _RET_ERRNO | errno.EAFNOSUPPORT)]),
                       ("clone", [(_LD_W_ABS, 0, 0, _OFF_ARG0), (_JSET, "allow", 0, CLONE_THREAD),
                                  (_RET, 0, 0, _RET_ERRNO | errno.EPERM)]),
                       ("allow", [(_RET, 0, 0, _RET_ALLOW)])):
        labels[name] = len(prog)
        prog += body
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise AssertionError("seccomp jump out of range")
        out.append((code, jt, jf, k))
    return out


def install(machine: str | None = None) -> None:
    """Apply the filter to every thread of this process (no_new_privs must be set first:
    see :func:`privileges.drop`)."""
    machine = machine or platform.machine()
    insns = build(machine)
    array = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_NR_SECCOMP[machine]), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                          ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if result != 0:
        err = ctypes.get_errno()
        # result > 0: the id of a thread that could not be synchronised
        raise OSError(err or errno.EBUSY, f"seccomp(SET_MODE_FILTER, TSYNC): {os.strerror(err) if err else result}")


def mode(pid: int | None = None) -> int:
    """The ``Seccomp`` mode of a process (0 none, 2 filter), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
