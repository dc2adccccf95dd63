"""A private, hypervisor-less xenstore daemon for tests, the demo and benchmarks.

``Xenstored.start()`` runs Debian's ``oxenstored`` with the ``xsstub`` LD_PRELOAD
stub (``simdom0/native/xsstub.c``), which fakes libxenctrl/libxenevtchn and
rewrites every path under the host's ``/var/run/xenstored``, ``/var/run/xen``
and ``/var/log/xen`` into the instance directory. Each instance has its own
directory, socket, config, pid file and logs, so instances run in parallel and
never touch the host's xenstored.

Lifetime: ``stop()`` (or leaving the ``with`` block) kills the daemon and
removes the directory. Instances still running at interpreter exit are stopped
by an atexit hook; if the interpreter dies hard, the daemon gets SIGKILL from
the kernel (PR_SET_PDEATHSIG on the spawning thread, so start it from a
long-lived thread, normally the main thread), and the next ``start()`` sweeps
directories whose owner process is gone.

    with Xenstored.start() as xsd:
        xs = XenStore(xsd.socket_path)
"""

from __future__ import annotations

import atexit
import errno
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from simdom0.native.build import native_lib

__all__ = ["Xenstored", "XenstoredError", "find_oxenstored"]

_DIR_PREFIX = "pcibackd-xs-"
_OWNER_FILE = "owner"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1

# Why each key: keep every file in the instance dir; no on-disk database; no
# artificial EAGAINs (tests inject their own conflicts).
_BASE_CONFIG = {
    "persistent": "false",
    "test-eagain": "false",
    "xenstored-log-level": "info",
}

# Host variables the daemon must not inherit: a systemd NOTIFY_SOCKET would
# let it signal READY for *our* service; stale LD_PRELOAD or xenstored paths
# would confuse it.
_SCRUBBED_ENV = ("NOTIFY_SOCKET", "LD_PRELOAD", "XENSTORED_PATH", "XENSTORED_RUNDIR")


class XenstoredError(RuntimeError):
    """The daemon could not be started (message includes its output)."""


def _version_key(path: str) -> tuple[int, ...]:
    version = path.split("/usr/lib/xen-", 1)[1].split("/", 1)[0]
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def find_oxenstored() -> str | None:
    """Path of the real oxenstored: $PCIBACKD_OXENSTORED, /usr/lib/xen-*/bin, $PATH.

    Debian's /usr/sbin/oxenstored is xen-utils-wrapper, which refuses to run
    without a hypervisor, so the versioned binary comes first and the wrapper
    is skipped.
    """
    explicit = os.environ.get("PCIBACKD_OXENSTORED")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    candidates = sorted(glob.glob("/usr/lib/xen-*/bin/oxenstored"), key=_version_key, reverse=True)
    found = shutil.which("oxenstored")
    if found and "xen-utils-wrapper" not in os.path.realpath(found):
        candidates.append(found)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _process_started(pid: int) -> str | None:
    """Start time (field 22 of /proc/PID/stat) identifying a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses; the fields after the last ')' are fixed.
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def _pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (an orphan may never be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _sweep_stale_dirs() -> None:
    """Remove instance dirs left behind by processes that died without cleanup."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _DIR_PREFIX + "*")):
        try:
            pid_s, started = Path(path, _OWNER_FILE).read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if _process_started(pid) == started:
            continue
        try:
            daemon_pid = int(Path(path, "xenstored.pid").read_text())
        except (OSError, ValueError):
            daemon_pid = None
        if daemon_pid is not None and _pid_alive(daemon_pid):
            continue  # orphaned daemon still running: leave it to its owner's PDEATHSIG
        shutil.rmtree(path, ignore_errors=True)


class Xenstored:
    """One running oxenstored instance; create with :meth:`start`.

    Attributes: ``workdir`` (instance directory), ``socket_path``, ``pid``,
    ``log_path`` (daemon log), ``env`` (``{"XENSTORED_PATH": socket_path}``,
    to merge into a client's environment).
    """

    _live: set[Xenstored] = set()
    _live_lock = threading.Lock()

    def __init__(self, proc: subprocess.Popen, workdir: Path, socket_path: str, keep: bool):
        self._proc = proc
        self._owner_pid = os.getpid()
        self._keep = keep
        self._stopped = False
        self.workdir = workdir
        self.socket_path = socket_path
        self.pid = proc.pid
        self.log_path = workdir / "xenstored.log"
        self.env = {"XENSTORED_PATH": socket_path}

    # -- lifecycle -----------------------------------------------------------

    @classmethod
    def start(
        cls,
        workdir: Path | str | None = None,
        *,
        binary: str | None = None,
        timeout: float = 5.0,
        access_log: bool = False,
        config: Mapping[str, object] | None = None,
        keep: bool = False,
    ) -> Xenstored:
        """Start a daemon and wait until its socket accepts connections.

        ``workdir`` must be absent or empty (default: a fresh dir in $TMPDIR);
        it is removed by :meth:`stop` unless ``keep``. ``config`` adds or
        overrides oxenstored.conf keys (e.g. ``{"xenstored-log-level": "debug"}``).
        """
        binary = binary or find_oxenstored()
        if binary is None:
            raise XenstoredError("oxenstored not found (install xen-utils or set PCIBACKD_OXENSTORED)")
        stub = native_lib("xsstub")
        _sweep_stale_dirs()
        workdir = cls._make_workdir(workdir)
        socket_path = str(workdir / "socket")
        try:
            if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
                raise XenstoredError(f"socket path too long for AF_UNIX: {socket_path}")
            conf = workdir / "oxenstored.conf"
            conf.write_text(cls._config_text(workdir, config))
            argv = [binary, "--no-fork", "--no-domain-init", "--config-file", str(conf)]
            if not access_log:
                argv.append("--no-access-log")
            env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
            env.update(
                LD_PRELOAD=str(stub),
                PCIBACKD_XS_RUNDIR=str(workdir),
                PCIBACKD_XS_SOCKET=socket_path,
            )
            # PDEATHSIG fires when the spawning *thread* exits: only safe to
            # request from the main thread; other threads rely on atexit.
            if threading.current_thread() is threading.main_thread():
                env["PCIBACKD_XS_PARENT_PID"] = str(os.getpid())
            with open(workdir / "daemon.out", "wb") as out:
                proc = subprocess.Popen(
                    argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
        except BaseException:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        self = cls(proc, workdir, socket_path, keep)
        with cls._live_lock:
            cls._live.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _make_workdir(workdir: Path | str | None) -> Path:
        if workdir is None:
            path = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX))
            started = _process_started(os.getpid())
            (path / _OWNER_FILE).write_text(f"{os.getpid()} {started}\n")
            return path
        path = Path(workdir).absolute()
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise XenstoredError(f"workdir {path} is not empty")
        return path

    @staticmethod
    def _config_text(workdir: Path, extra: Mapping[str, object] | None) -> str:
        entries = dict(_BASE_CONFIG)
        entries.update(
            {
                "pid-file": str(workdir / "xenstored.pid"),
                "xenstored-log-file": str(workdir / "xenstored.log"),
                "access-log-file": str(workdir / "access.log"),
            }
        )
        for key, value in (extra or {}).items():
            entries[key] = str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in entries.items():
            if "\n" in key or "\n" in value or "=" in key:
                raise XenstoredError(f"bad config entry {key!r}={value!r}")
        return "".join(f"{k} = {v}\n" for k, v in entries.items())

    def _wait_ready(self, timeout: float) -> None:
        """Poll (with backoff, under a deadline) until a connect succeeds."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            if self._proc.poll() is not None:
                raise XenstoredError(self._failure(f"exited with status {self._proc.returncode}"))
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(max(0.05, deadline - time.monotonic()))
                probe.connect(self.socket_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED):
                    raise XenstoredError(self._failure(f"socket error {exc}")) from exc
            finally:
                probe.close()
            if time.monotonic() >= deadline:
                raise XenstoredError(self._failure(f"not ready after {timeout:.1f}s"))
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _failure(self, what: str) -> str:
        parts = [f"oxenstored (pid {self.pid}, dir {self.workdir}) {what}"]
        for name in ("daemon.out", "xenstored.log"):
            tail = _tail(self.workdir / name, 20)
            if tail:
                parts.append(f"--- {name} (tail) ---\n{tail}")
        return "\n".join(parts)

    def alive(self) -> bool:
        """True while the daemon process runs."""
        return self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the daemon's log (for failure messages)."""
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; reap; remove the directory.

        Idempotent. A no-op in a forked child: the daemon belongs to the parent.
        """
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        try:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            with self._live_lock:
                self._live.discard(self)
            if not self._keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Xenstored:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Xenstored pid={self.pid} {state} socket={self.socket_path}>"

    # -- process-wide cleanup ------------------------------------------------

    @classmethod
    def _stop_all(cls) -> None:
        with cls._live_lock:
            live = list(cls._live)
        for inst in live:
            inst.stop()

    @classmethod
    def _forget_all(cls) -> None:
        # A forked child must neither stop nor reap its parent's daemons.
        cls._live_lock = threading.Lock()
        cls._live = set()


atexit.register(Xenstored._stop_all)
os.register_at_fork(after_in_child=Xenstored._forget_all)
