"""A private systemd for testing a unit: PID 1 of new PID, mount, UTS, IPC and
cgroup namespaces, the way a container manager (systemd-nspawn) boots one, so
`systemctl start/kill/restart/reload` act on a real service manager without
touching the host's init or its /etc/systemd.

What the box gets (everything else is the host's, seen through the namespaces):
  * its own cgroup: a new directory of the host's cgroup2 hierarchy, the root of
    its cgroup namespace, mounted at /sys/fs/cgroup (systemd's unified mode);
  * a fresh tmpfs on /run (systemd's private socket, the units' runtime dirs),
    with the host's /run directories named in ``keep_run``;
  * a private /dev (a few device nodes bound from the host, more on request, /dev/shm
    the host's so the test and the service share the simulation's files;
    /dev/console a log file);
  * /proc/sys read-only (systemd would bump global sysctls), /proc its own;
  * /etc, /var, /tmp and /usr/local as overlays whose writes land in the box's
    directory (StateDirectory=, PrivateTmp=, an installed config, /usr/local/sbin
    links) and vanish with it (unless shared: ``overlays``);
  * unit files only from its own directory (SYSTEMD_UNIT_PATH) and no generators:
    the host's units (tmpfiles, getty, ...) are not even loaded.
The network namespace is the host's: the simulation's event channels are
abstract unix sockets.  :meth:`stop` (also on any failure) ends the namespace's
init, which kills everything in it, and removes the cgroup and the directory.
From a shell: ``python tests/systemd_box.py start|stop DIR`` (``--help``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import psutil

from waiting import process_gone, wait_until

SYSTEMD = "/lib/systemd/systemd"

# The host's journald and its sockets: the box's units log to a journal of its own.
JOURNALD_UNITS = ("systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket",
                  "systemd-journald-audit.socket")
_HOST_UNITS = Path("/lib/systemd/system")

# Targets the manager and DefaultDependencies= refer to, empty.
_STUB_TARGETS = ("sysinit.target", "basic.target", "shutdown.target", "sockets.target",
                 "paths.target", "timers.target", "local-fs.target", "multi-user.target", "umount.target",
                 "network.target", "network-online.target", "swap.target", "local-fs-pre.target")

# The host's directories a box writes to through an overlay.
OVERLAYS = ("/etc", "/var", "/tmp", "/usr/local")

_SETUP = r"""
set -eu
W="$1"; shift
mount --make-rprivate /
# /dev: private, with the nodes a service may use and the host's /dev/shm
mkdir -p "$W/dev"
mount -t tmpfs -o mode=755,nosuid tmpfs "$W/dev"
for n in null zero full random urandom tty ptmx $BOX_DEV; do
    if [ -d "/dev/$n" ]; then mkdir -p "$W/dev/$n"; else touch "$W/dev/$n"; fi
    mount --bind "/dev/$n" "$W/dev/$n"
done
mkdir "$W/dev/shm" "$W/dev/pts" "$W/dev/mqueue"
mount --bind /dev/shm "$W/dev/shm"
touch "$W/dev/console"; mount --bind "$W/console.log" "$W/dev/console"
ln -s /proc/self/fd "$W/dev/fd"
mount --move "$W/dev" /dev
# /run: a fresh tmpfs, but for the host's directories named in BOX_RUN_KEEP
for d in $BOX_RUN_KEEP; do mkdir -p "$W/keep/$d"; mount --bind "/run/$d" "$W/keep/$d"; done
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
for d in $BOX_RUN_KEEP; do mkdir -p "/run/$d"; mount --move "$W/keep/$d" "/run/$d"; done
for d in $BOX_OVERLAYS; do
    o="$W/overlay$(echo "$d" | tr / _)"; mkdir -p "$o/upper" "$o/work"
    mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/upper,workdir=$o/work" "$d"
done
mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys /proc/sys
# on a tmpfs: the kernel refuses cgroup2 over a cgroup2 mount's root (a host's unified layout)
mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
[ -x "$W/prepare" ] && "$W/prepare"
exec env -i container=pcibackd-test-box "SYSTEMD_UNIT_PATH=$W/units" \
    "SYSTEMD_GENERATOR_PATH=$W/none" "SYSTEMD_ENVIRONMENT_GENERATOR_PATH=$W/none" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    "$@"
"""


def _rmdir(path: Path) -> bool:
    """A cgroup's rmdir: EBUSY while the kernel still counts its last exiting tasks."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


def cgroup2_root() -> Path | None:
    """Where the host mounts its cgroup2 hierarchy (unified or hybrid layout)."""
    for cand in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        try:
            if os.statvfs(cand) and (cand / "cgroup.procs").exists() and (cand / "cgroup.subtree_control").exists():
                return cand
        except OSError:
            continue
    return None


def unavailable() -> str | None:
    """Why a box cannot boot here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, a cgroup)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"needs {SYSTEMD} (apt install systemd)"
    for tool in ("unshare", "nsenter", "systemctl", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    root = cgroup2_root()
    if root is None:
        return "needs a cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    if not os.access(root, os.W_OK):
        return f"needs a writable cgroup2 hierarchy ({root} is read-only)"
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--mount-proc",
                        "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot make namespaces here: {p.stderr.strip()}"
    return None


class SystemdBox:
    """Boot with :meth:`start` (a context manager); units go into :attr:`units`
    before it, or later followed by ``daemon-reload``."""

    def __init__(self, workdir: Path, dev: tuple[str, ...] = (), keep_run: tuple[str, ...] = (),
                 overlays: tuple[str, ...] = OVERLAYS):
        """``dev``: more of the host's /dev entries (files or directories such as
        ``xen``) in the box's /dev; ``keep_run``: directories of the host's /run
        the box shares (a daemon's sockets, reached from outside); ``overlays``:
        the host's directories whose writes stay in the box (the others the box
        shares, their submounts with them)."""
        self.dir = Path(workdir)
        self.env = dict(os.environ, BOX_DEV=" ".join(dev), BOX_RUN_KEEP=" ".join(keep_run),
                        BOX_OVERLAYS=" ".join(overlays))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.units = self.dir / "units"
        self.units.mkdir(exist_ok=True)
        (self.dir / "none").mkdir(exist_ok=True)
        for name in _STUB_TARGETS:
            (self.units / name).write_text("[Unit]\nDescription=box stub\n")
        for name in JOURNALD_UNITS:
            shutil.copyfile(_HOST_UNITS / name, self.units / name)
        (self.units / "box.target").write_text("[Unit]\nDescription=the box's boot\n"
                                               "Wants=systemd-journald.service\n")
        self.console = self.dir / "console.log"
        self.console.touch()
        self.cgroup = cgroup2_root() / f"pcibackd-test-box-{os.getpid()}-{time.monotonic_ns()}"
        self.unshare: subprocess.Popen | None = None
        self.pid: int | None = None             # systemd's pid, as the host sees it

    def prepare(self, script: str) -> None:
        """Shell run inside the box's mount namespace before systemd starts (with
        the overlays in place: what it writes under /etc, /var, /usr/local stays in the box)."""
        path = self.dir / "prepare"
        path.write_text("#!/bin/sh\nset -eu\n" + script)
        path.chmod(0o755)

    def start(self, timeout: float = 60.0) -> "SystemdBox":
        try:
            self.cgroup.mkdir()
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup),
                    "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "--mount-proc",
                    "--propagation", "private", "sh", "-c", _SETUP, "box", str(self.dir),
                    SYSTEMD, "--unit=box.target", "--log-target=journal", "--log-level=info",
                    "--show-status=no"]
            log = open(self.dir / "boot.log", "wb")
            self.unshare = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=self.env)
            log.close()
            self.pid = wait_until(self._systemd_pid, timeout=timeout, what=self._why)
            wait_until(lambda: self.systemctl("is-system-running", check=False).stdout.strip()
                       in ("running", "degraded"), timeout=timeout, what=self._why)
            state = self.show("systemd-journald.service", "ActiveState")["ActiveState"]
            if state != "active":
                raise RuntimeError(f"the box's journald is {state}:\n{self._why()}")
        except BaseException as exc:
            try:
                self.stop()
            except Exception as also:       # the first failure is the one to show
                exc.add_note(f"(and stopping the box: {also})")
            raise
        return self

    def _systemd_pid(self) -> int | None:
        if self.unshare.poll() is not None:
            raise RuntimeError(f"the box's init exited ({self.unshare.returncode}):\n{self._why()}")
        try:
            # by name, not by executable path: /proc/PID/exe of a process in another mount
            # namespace may name its file from that namespace's root (a chroot's host path)
            for child in psutil.Process(self.unshare.pid).children():
                if child.name() == "systemd":
                    return child.pid
        except psutil.Error:
            pass
        return None

    def _why(self) -> str:
        out = "boot log:\n" + (self.dir / "boot.log").read_text(errors="replace")[-3000:]
        if self.pid is not None and not process_gone(self.pid):
            for argv in (("systemctl", "is-system-running"), ("systemctl", "--no-pager", "list-jobs"),
                         ("journalctl", "--no-pager", "-n", "60")):
                p = self.run(*argv, check=False)
                out += f"\n{' '.join(argv)} (exit {p.returncode}):\n{p.stdout}{p.stderr}"
        return out

    # ---------------------------------------------------------- inside --
    def run(self, *argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``argv`` in the box's namespaces (its /run, its pids)."""
        # --root, --wd: setns into a mount namespace resets the root to that namespace's own
        # (under a chroot, such as the Xen lane's dom0, not the root systemd runs in)
        p = subprocess.run(["nsenter", "--target", str(self.pid), "--root", "--wd", "--mount", "--pid", "--uts",
                            "--ipc", "--cgroup", "--", *argv], capture_output=True, text=True, timeout=timeout,
                           env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", "--no-ask-password", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """``journalctl --no-pager -o cat ARGS`` in the box."""
        return self.run("journalctl", "--no-pager", *args).stdout

    def path(self, inside: str) -> Path:
        """A path of the box's mount namespace, as the host reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def host_pid(self, box_pid: int) -> int | None:
        """The host's pid of the box's ``box_pid`` (NSpid in /proc/PID/status)."""
        for proc in psutil.Process(self.pid).children(recursive=True) + [psutil.Process(self.pid)]:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            if int(line.split()[-1]) == box_pid:
                                return proc.pid
            except OSError:
                continue
        return None

    # -------------------------------------------------------------- stop --
    def stop(self) -> None:
        """Kill every process of the box (the namespace's init first: the kernel then ends
        its pid namespace; then whatever its cgroup still holds), remove the cgroup."""
        if self.pid is not None and not process_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        if self.cgroup.exists():
            wait_until(self._emptied, timeout=30, what=f"{self.cgroup} to empty")
            for d in sorted(self._cgroups(), key=lambda p: len(p.parts), reverse=True):
                wait_until(lambda: _rmdir(d), timeout=30, what=f"{d} removed")
        if self.unshare is not None:
            self.unshare.wait(30)
        self.unshare = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _emptied(self) -> bool:
        """Whether the box's cgroup is empty; if not, SIGKILL to each process in it."""
        if "populated 0" in (self.cgroup / "cgroup.events").read_text():
            return True
        for d in self._cgroups():
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return False

    def _cgroups(self) -> list[Path]:
        return [Path(root) for root, _, _ in os.walk(self.cgroup)]

    def __enter__(self) -> "SystemdBox":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- command line --
# The Xen lane boots a box in its dom0 from a shell script: `start` leaves it
# running and notes its pids in DIR/box.json, `stop` ends it from that note.

def _save(box: SystemdBox) -> None:
    (box.dir / "box.json").write_text(json.dumps({"pid": box.pid, "cgroup": str(box.cgroup)}))


def _saved(workdir: Path) -> SystemdBox:
    box = SystemdBox.__new__(SystemdBox)
    note = json.loads((workdir / "box.json").read_text())
    box.dir, box.unshare, box.units = workdir, None, workdir / "units"
    box.pid, box.cgroup = note["pid"], Path(note["cgroup"])
    return box


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="systemd_box.py", description="A private systemd as PID 1 of new namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="boot a box in DIR, print systemd's pid (as this namespace sees it)")
    st.add_argument("dir", type=Path)
    st.add_argument("--dev", action="append", default=[], help="a /dev entry of this host to give the box")
    st.add_argument("--keep-run", action="append", default=[], help="a /run directory the box shares")
    st.add_argument("--share", action="append", default=[], choices=OVERLAYS,
                    help="a directory the box shares (with its submounts) instead of an overlay")
    st.add_argument("--unit", action="append", default=[], type=Path, help="a unit file (or drop-in "
                    "directory NAME.d) for the box")
    st.add_argument("--prepare", type=Path, help="shell script run in the box before systemd")
    st.add_argument("--timeout", type=float, default=60.0)
    sp = sub.add_parser("stop", help="end the box booted in DIR")
    sp.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "stop":
        _saved(args.dir).stop()
        return 0
    why = unavailable()
    if why:
        print(f"systemd_box: {why}", file=sys.stderr)
        return 77
    box = SystemdBox(args.dir, dev=tuple(args.dev), keep_run=tuple(args.keep_run),
                     overlays=tuple(d for d in OVERLAYS if d not in args.share))
    for unit in args.unit:
        (shutil.copytree if unit.is_dir() else shutil.copyfile)(unit, box.units / unit.name)
    if args.prepare:
        box.prepare(args.prepare.read_text())
    try:
        box.start(timeout=args.timeout)
    except (AssertionError, RuntimeError) as exc:
        print("systemd_box: " + "".join(traceback.format_exception_only(exc)), file=sys.stderr)
        return 1
    _save(box)
    print(box.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
