"""SIGTERM: the supervisor leaves its workers serving for a successor.

systemd 252 does not tell a service whether a stop is half of a restart, and a
restart that stopped the workers would leave every guest's op waiting through
the gap between two supervisors (Linux pcifront gives up on an op after 2 s).
So on SIGTERM the supervisor tells each worker that it is leaving (a
``handover`` command, its last message on the link) and exits without
stopping it.  The worker serves on for ``handover_grace`` seconds; the first
ack it gets after that comes from a successor that adopted it (pid files, as
after a crash), and if none comes it stops as on SIGTERM, leaving its xenbus
state for a later supervisor to resume.  With ``KillMode=process`` systemd
leaves the workers in the unit's cgroup.

A worker that never spoke on the link (still booting) cannot be told: it is
stopped as before.  SIGINT (Ctrl-C in the foreground) and ``handover_grace =
0`` stop every worker at once.
"""

from __future__ import annotations

from loguru import logger

from pcibackd.daemon.devicegate import route_to
from pcibackd.daemon.spawner import disown
from pcibackd.worker.link import WorkerCommand

HANDOVER_LINGER_MS = 1000      # closing the worker socket waits this long for the handover frames to go


def hand_over(sup, live: dict) -> dict:
    """Send ``handover`` to each worker of ``live`` ({sentinel: guest}) that has a route;
    the ones that could not be told (to be stopped as before)."""
    grace = sup.cfg.handover_grace
    frame = WorkerCommand("handover", {"grace": grace}, None).to_json()
    left = {}
    for sentinel, guest in live.items():
        if not (guest.route and sup._send(route_to(guest), frame)):
            left[sentinel] = guest
        elif guest.proc is not None:
            disown(guest.proc)
    told = len(live) - len(left)
    logger.info("handing {} worker(s) over: each serves on for {:.1f} s for a successor to adopt it{}",
                told, grace, f"; stopping {len(left)} that never reported" if left else "")
    return left
