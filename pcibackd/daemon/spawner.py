"""A clean fork point for workers, created before any thread exists.

pyxs, pyzmq and loguru's enqueue all start threads, and forking a threaded
process can deadlock the child on a lock held by a thread that does not
exist there.  The supervisor therefore starts multiprocess's *forkserver*
first thing: a single-threaded process that has only imported the worker
module, and that forks every worker.  Workers never inherit the supervisor's
xenstore connection, ZeroMQ context or sockets.
"""

from __future__ import annotations

import os

import multiprocess as mp
import multiprocess.forkserver as forkserver
from loguru import logger

from pcibackd.worker.privileges import FOR_UID_WORKERS, lock_away, missing

# Everything a worker imports, so a restarted worker starts warm (a pending
# op is waiting); none of these start threads at import time.
_PRELOAD = ["pcibackd.worker.main", "pcibackd.worker.link", "pcibackd.worker.reporter",
            "pcibackd.worker.devices", "pcibackd.worker.interrupts",
            "pcibackd.xenstore.client", "pcibackd.platform.select", "pcibackd.confspace",
            "pcibackd.hostpci.sysfs", "pcibackd.worker.landlock", "pcibackd.worker.seccomp",
            "pcibackd.worker.devicegate", "zmq", "psutil"]


class Spawner:
    """Starts worker processes from the forkserver."""

    def __init__(self, platform_module: str):
        """``platform_module`` (the chosen platform's module) is preloaded too."""
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload([*_PRELOAD, platform_module])

    def start(self) -> None:
        """Start the fork server now, while this process has no threads.

        Its listener takes a pickled program from anyone who can connect and runs it
        with the fork server's privileges (root, every capability): its directory goes
        to the locked uid, which no worker (a uid of its own) can enter.  The workers it
        forks switch to their uids themselves, which needs the capabilities checked here."""
        if os.geteuid() == 0 and (lacking := missing(FOR_UID_WORKERS)):
            logger.error("no {}: workers cannot run as uids of their own, nor be signalled once they do "
                         "(a service's CapabilityBoundingSet= must keep them)", ", ".join(lacking))
        forkserver.ensure_running()
        address = getattr(forkserver._forkserver, "_forkserver_address", None)
        if isinstance(address, str) and address.startswith("/"):
            lock_away(os.path.dirname(address))

    def restart(self) -> None:
        """Forget a dead fork server; the next spawn starts a fresh one."""
        try:
            forkserver._forkserver._stop()
        except Exception:
            pass

    def spawn(self, target, *args, name: str | None = None):
        """A started worker process (``.pid``, ``.sentinel``, ``.exitcode``);
        the supervisor keeps one fd for it, the sentinel."""
        proc = self.ctx.Process(target=target, args=args, name=name, daemon=False)
        proc.start()
        _drop_parent_pipe(proc)
        return proc


def disown(proc) -> None:
    """Leave a worker running past our exit: multiprocess joins its children at exit."""
    getattr(mp.process, "_children", set()).discard(proc)


def _drop_parent_pipe(proc) -> None:
    """Close the second fd multiprocess keeps per child: a copy of the data pipe's
    write end, by which a child could tell that its parent died (workers learn
    that from the supervisor link instead).  Leaves unknown layouts alone."""
    finalizer = getattr(getattr(proc, "_popen", None), "finalizer", None)
    args = getattr(finalizer, "_args", None)
    if not (isinstance(args, tuple) and len(args) == 2 and all(isinstance(fd, int) for fd in args)):
        return
    parent_w, sentinel = args          # Finalize(popen, close_fds, (parent_w, sentinel))
    if sentinel != proc.sentinel or parent_w == sentinel:
        return
    os.close(parent_w)
    finalizer._args = (sentinel,)
