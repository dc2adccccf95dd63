"""What the metrics show, as plain JSON-able data taken from the supervisor at once.

Shared by ``pcibackctl metrics`` (the daemon sends this data, pcibackctl turns
it into text) and ``pcibackd run --metrics-listen`` (the supervisor's loop
publishes it for the HTTP thread): see :mod:`pcibackd.control.exposition`.
Taking it never waits for a worker: counters are the supervisor's totals of
the workers' last reports, CPU seconds as read from /proc within the last
sampling window (control/procstats.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict

from pcibackd.control.face import DaemonFace
from pcibackd.control.statusview import StatusView
from pcibackd.worker.ops import SERVICE_BOUNDS_US


def collect(face: DaemonFace) -> dict:
    """The daemon and every guest's counters (over all its workers)."""
    guests = []
    for g in StatusView.of(face).fresh(time.monotonic()):      # CPU seconds read within the window
        t = g.totals
        guests.append({
            "domid": g.domid, "name": g.name, "state": g.state.value, "restarts": g.restarts,
            "served": dict(t.served) if t else {},
            "errors": {op: dict(c) for op, c in t.errors.items()} if t else {},
            "misses": {op: dict(c) for op, c in t.misses.items()} if t else {},
            "service": {"bounds_us": list(SERVICE_BOUNDS_US), "counts": list(t.service_counts),
                        "sum_us": t.service_sum_us} if t and t.service_counts else None,
            "cpu_seconds": t.cpu_seconds if t else 0.0,
            "devices": [{"bdf": str(d.bdf), "denied_writes": d.denied_writes} for d in g.devices]})
    return {"daemon": asdict(face.about()), "pool_size": _pool_size(face),
            "assignable": len(face.assignable()), "guests": guests}


def _pool_size(face: DaemonFace) -> int:
    # The daemon's own pool of hidden functions; a daemon without one reports 0.
    size = getattr(face, "pool_size", None)
    return int(size()) if callable(size) else 0
