"""Finding the live worker a previous supervisor left for a guest.

A worker writes ``<runtime>/workers/dom<N>.pid`` (pid, start time, token).
The supervisor takes it over through a pidfd, after checking that the pid
still names the process that wrote the file (a pid can be reused).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from pcibackd.daemon.guests import Guest
from pcibackd.worker.main import pidfile_path

SAME_START = 0.01        # seconds: create times of one process agree to this


@dataclass(frozen=True)
class LiveWorker:
    pid: int
    pidfd: int               # also its exit sentinel; the caller owns it
    token: str


def find_live_worker(runtime: Path, domid: int) -> LiveWorker | None:
    """The worker serving ``domid`` that an earlier supervisor started, if it still runs."""
    try:
        pid_text, started_text, token = pidfile_path(runtime, domid).read_text().split()
        pid, started = int(pid_text), float(started_text)
        fd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    try:
        same = abs(psutil.Process(pid).create_time() - started) < SAME_START
    except psutil.Error:
        same = False
    if not same:
        os.close(fd)       # a stale pid file, the pid reused by another process
        return None
    return LiveWorker(pid, fd, token)


def adopt_live_worker(runtime: Path, guest: Guest) -> bool:
    """Take over the live worker a previous supervisor left for ``guest``; False if there is none."""
    found = find_live_worker(runtime, guest.domid)
    if found is None:
        return False
    guest.token = found.token
    guest.attach(found.pid, found.pidfd, found.pidfd, adopted=True, now=time.monotonic())
    logger.info("adopted the running worker of domain {} (pid {})", guest.domid, found.pid)
    return True
