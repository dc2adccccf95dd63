"""Lane helper (stdlib only): start pcibackd and wait for its sd_notify READY=1,
stop it with SIGTERM.  Runs inside the lane's dom0.

    daemonctl.py start PIDFILE LOGFILE TIMEOUT -- CMD...   exit 0 once READY=1 arrived
    daemonctl.py stop PIDFILE TIMEOUT                      SIGTERM, wait, print the exit status
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def _start(pidfile: str, logfile: str, timeout: float, cmd: list[str]) -> int:
    sockdir = tempfile.mkdtemp(prefix="lane-notify-")
    path = os.path.join(sockdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    with open(pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"daemon exited with status {proc.returncode} before READY=1")
            return 1
        sock.settimeout(0.2)
        try:
            msg = sock.recv(4096).decode(errors="replace")
        except socket.timeout:
            continue
        if "READY=1" in msg.split("\n"):
            print(f"daemon pid {proc.pid} ready after {timeout - (deadline - time.monotonic()):.1f}s")
            return 0
    print(f"no READY=1 from daemon pid {proc.pid} within {timeout}s")
    return 1


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
    if verb == "stop":
        return _stop(rest[0], float(rest[1]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
