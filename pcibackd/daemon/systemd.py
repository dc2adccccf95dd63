"""sd_notify without libsystemd (READY=1, STATUS=, WATCHDOG=1, STOPPING=1, RELOADING=1)."""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Iterable

from pcibackd.daemon.states import WorkerState


def notify(message: str) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]       # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds when the watchdog is ours, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


# The states worth a word in `systemctl status`, in this order.
_SHOWN = (WorkerState.STARTING, WorkerState.BACKOFF, WorkerState.STOPPING, WorkerState.FATAL)


def describe(states: Iterable[WorkerState]) -> str:
    """The STATUS= line: ``serving 3 guest(s)``, then any guest not running normally."""
    counts = Counter(s for s in states if s is not WorkerState.EXITED)
    text = f"serving {sum(counts.values())} guest(s)"
    extra = [f"{counts[s]} {s.value.lower()}" for s in _SHOWN if counts[s]]
    return text + (f" ({', '.join(extra)})" if extra else "")


class Status:
    """STATUS= sent only when it changes (the loop calls :meth:`update` every turn)."""

    def __init__(self) -> None:
        self.last: str | None = None

    def update(self, text: str, also: str = "") -> bool:
        """Send STATUS=``text`` if it is new (``also``: more assignments in the same message)."""
        if text == self.last and not also:
            return False
        self.last = text
        return notify((f"{also}\n" if also else "") + f"STATUS={text}")
