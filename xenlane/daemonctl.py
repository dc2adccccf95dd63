"""Lane helper (stdlib only): start pcibackd and wait for its sd_notify READY=1,
reload it, stop it with SIGTERM.  Runs inside the lane's dom0.

    daemonctl.py start PIDFILE LOGFILE TIMEOUT -- CMD...   exit 0 once READY=1 arrived
    daemonctl.py unit-start UNIT PIDFILE LOGFILE NOTIFYLOG TIMEOUT [--map FROM=TO] [--env K=V] [-- ARGS...]
        what systemd runs for UNIT (unitfile.py): its ExecStartPre lines, then
        ExecStart (ARGS appended) in systemd's clean environment (PATH,
        Environment=, EnvironmentFile=, NOTIFY_SOCKET, WATCHDOG_USEC/PID,
        RUNTIME_DIRECTORY, INVOCATION_ID; --env adds lane diagnostics), with its
        UMask=, LimitNOFILE= and NoNewPrivileges=; exit 0 once READY=1 arrived.
        A listener keeps logging every notify message (sender pid, text) to
        NOTIFYLOG until the daemon is gone.
    daemonctl.py unit-reload UNIT PIDFILE [--map FROM=TO] [--env K=V]
        every ExecReload line in order, $MAINPID substituted; exit 0 when all passed
    daemonctl.py stop PIDFILE TIMEOUT                      SIGTERM, wait, print the exit status
    daemonctl.py unit-stop UNIT PIDFILE                    the same, bounded by the unit's TimeoutStopSec=
"""

from __future__ import annotations

import ctypes
import os
import resource
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from unitfile import SYSTEMD_PATH, Service, UnitError, parse_service, read_environment_file, substitute

PR_SET_NO_NEW_PRIVS = 38


def _wait_ready(proc: subprocess.Popen, timeout: float, ready) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"daemon exited with status {proc.returncode} before READY=1")
            return 1
        if ready():
            print(f"daemon pid {proc.pid} ready after {timeout - (deadline - time.monotonic()):.1f}s")
            return 0
    print(f"no READY=1 from daemon pid {proc.pid} within {timeout}s")
    return 1


def _start(pidfile: str, logfile: str, timeout: float, cmd: list[str]) -> int:
    sockdir = tempfile.mkdtemp(prefix="lane-notify-")
    path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(f"{proc.pid}\n")

    def ready() -> bool:
        try:
            return "READY=1" in sock.recv(4096).decode(errors="replace").split("\n")
        except socket.timeout:
            return False
    return _wait_ready(proc, timeout, ready)


# ------------------------------------------------------------ through the unit
def _options(rest: list[str]) -> tuple[list[str], dict[str, str], dict[str, str], list[str]]:
    """positional args, --map, --env, and what follows "--"."""
    pos, mapping, extra_env, tail = [], {}, {}, []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            tail = rest[i + 1:]
            break
        if a in ("--map", "--env"):
            k, _, v = rest[i + 1].partition("=")
            (mapping if a == "--map" else extra_env)[k] = v
            i += 2
            continue
        pos.append(a)
        i += 1
    return pos, mapping, extra_env, tail


def _service(unit: str, mapping: dict[str, str]) -> Service:
    with open(unit) as f:
        return parse_service(f.read(), mapping)


def _unit_env(svc: Service, extra: dict[str, str]) -> dict[str, str]:
    """The environment systemd gives the service's processes (plus the lane's ``extra``)."""
    env = {"PATH": SYSTEMD_PATH, "INVOCATION_ID": secrets.token_hex(16)}
    if "RuntimeDirectory" in svc.settings:
        env["RUNTIME_DIRECTORY"] = "/run/" + svc.settings["RuntimeDirectory"].split()[0]
    env.update(svc.environment)
    for path, optional in svc.environment_files:
        if os.path.exists(path) or not optional:
            env.update(read_environment_file(path))
    env.update(extra)
    return env


def _exec_limits(svc: Service):
    """preexec_fn: UMask=, LimitNOFILE=, NoNewPrivileges= as systemd applies them before exec."""
    umask = int(svc.settings["UMask"], 8) if "UMask" in svc.settings else None
    nofile = int(svc.settings["LimitNOFILE"]) if svc.settings.get("LimitNOFILE", "").isdigit() else None
    nnp = svc.flag("NoNewPrivileges")

    def apply() -> None:
        if umask is not None:
            os.umask(umask)
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if nnp and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            os._exit(126)
    return apply


def _run_lines(what: str, lines, env: dict[str, str], variables: dict[str, str], preexec) -> bool:
    for cmd in lines:
        argv = substitute(cmd.argv, variables)
        rc = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec).returncode
        print(f"{what}={cmd.text()}: exit {rc}" + (" (ignored: '-')" if rc and cmd.ignore_failure else ""))
        if rc and not cmd.ignore_failure:
            return False
    return True


def _listen(sock: socket.socket, notifylog: str, pid: int) -> None:
    """The notify socket's reader (a forked child): every message with its sender's pid, until
    the daemon is gone."""
    sock.settimeout(1.0)
    with open(notifylog, "a", buffering=1) as log:
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                if not os.path.exists(f"/proc/{pid}") or _state(pid) in (None, "Z"):
                    return
                continue
            sender = "?"
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = str(struct.unpack("3i", payload[:12])[0])
            text = data.decode(errors="replace").strip().replace("\n", "|")
            log.write(f"{time.monotonic():.3f} pid={sender} {text}\n")


def _unit_start(rest: list[str]) -> int:
    pos, mapping, extra, tail = _options(rest)
    unit, pidfile, logfile, notifylog, timeout = pos
    try:
        svc = _service(unit, mapping)
    except (OSError, UnitError) as exc:
        print(f"{unit}: {exc}")
        return 1
    env, preexec = _unit_env(svc, extra), _exec_limits(svc)
    if "RuntimeDirectory" in svc.settings:
        rundir = env["RUNTIME_DIRECTORY"]
        os.makedirs(rundir, exist_ok=True)
        os.chmod(rundir, int(svc.settings.get("RuntimeDirectoryMode", "0755"), 8))
    if not _run_lines("ExecStartPre", svc.start_pre, env, {}, preexec):
        return 1
    sockdir = tempfile.mkdtemp(prefix="lane-notify-")
    path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)     # before the first message
    env["NOTIFY_SOCKET"] = path
    argv = [*svc.start.argv, *tail]
    if "WatchdogSec" in svc.settings:
        env["WATCHDOG_USEC"] = str(int(svc.seconds("WatchdogSec", 0) * 1e6))
        # WATCHDOG_PID is the main process's own pid: known only once it runs
        argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", *argv]
    print(f"ExecStart={svc.start.text()}" + (f" + {' '.join(tail)}" if tail else ""))
    print("environment: " + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k != "INVOCATION_ID"))
    open(notifylog, "a").close()
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=preexec)
    with open(pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    if os.fork() == 0:                      # the listener outlives this command
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):                # nobody waits on our output for it
            os.dup2(null, fd)
        try:
            _listen(sock, notifylog, proc.pid)
        finally:
            os._exit(0)
    sock.close()

    def ready() -> bool:
        time.sleep(0.2)
        with open(notifylog) as f:
            return any(f"pid={proc.pid} " in line and "READY=1" in line.rstrip("\n").split(" ", 2)[2].split("|")
                       for line in f)
    return _wait_ready(proc, float(timeout), ready)


def _unit_reload(rest: list[str]) -> int:
    pos, mapping, extra, _ = _options(rest)
    unit, pidfile = pos
    try:
        svc = _service(unit, mapping)
    except (OSError, UnitError) as exc:
        print(f"{unit}: {exc}")
        return 1
    with open(pidfile) as f:
        pid = f.read().strip()
    env = dict(_unit_env(svc, extra), MAINPID=pid)
    return 0 if _run_lines("ExecReload", svc.reload, env, {"MAINPID": pid}, _exec_limits(svc)) else 1


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _stop(pidfile: str, timeout: float) -> int:
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("daemon already gone")
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # the daemon is our grandchild's sibling, not our child: poll for it
        if _state(pid) in (None, "Z"):
            print(f"daemon pid {pid} exited after SIGTERM")
            return 0
        time.sleep(0.1)
    print(f"daemon pid {pid} still running {timeout}s after SIGTERM; killing its group")
    os.killpg(pid, signal.SIGKILL)
    return 1


def main(argv: list[str]) -> int:
    verb, rest = argv[0], argv[1:]
    if verb == "start":
        sep = rest.index("--")
        pidfile, logfile, timeout = rest[:sep]
        return _start(pidfile, logfile, float(timeout), rest[sep + 1:])
    if verb == "unit-start":
        return _unit_start(rest)
    if verb == "unit-reload":
        return _unit_reload(rest)
    if verb == "stop":
        return _stop(rest[0], float(rest[1]))
    if verb == "unit-stop":          # KillMode=process: SIGTERM to the main process, TimeoutStopSec=
        return _stop(rest[1], _service(rest[0], {}).seconds("TimeoutStopSec", 90.0))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
