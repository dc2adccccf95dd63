"""What ``pcibackctl status`` answers, kept rendered between questions.

A status request costs what copying the answer costs, not what computing it
does: each guest's part is built and encoded as JSON once per change (a
report, a state change, a restart, its interrupts, a sample pass of
procstats.py) and kept; a request only joins the kept parts, each with the
time since its worker's last beat.  The guests' counters themselves are kept by the
supervisor's tallies (daemon/tally.py), summed once per report.  Nothing here
waits for a worker.

One :class:`StatusView` per daemon face (:meth:`StatusView.of`): the control
endpoint runs its sample passes from the supervisor's loop while someone
watches (:meth:`StatusView.due`, :meth:`StatusView.tick`).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import asdict

from pcibackd.control.face import DaemonFace
from pcibackd.control.procstats import Figures, ProcSampler
from pcibackd.control.protocol import RawJSON
from pcibackd.daemon.tally import Totals
from pcibackd.daemon.views import GuestInfo

_VIEWS: "weakref.WeakKeyDictionary[object, StatusView]" = weakref.WeakKeyDictionary()


class StatusView:
    """See the module docstring."""

    def __init__(self, face: DaemonFace, sampler: ProcSampler | None = None):
        self._face = weakref.ref(face)      # the view lives as long as its face, not longer
        self.sampler = sampler or ProcSampler()
        self._rows: dict[int, tuple[tuple, str]] = {}       # domid -> (what it was built from, its JSON
                                                            # but for the closing brace)

    @property
    def face(self) -> DaemonFace:
        return self._face()

    @classmethod
    def of(cls, face: DaemonFace) -> "StatusView":
        """The face's view (made at first use)."""
        view = _VIEWS.get(face)
        if view is None:
            view = _VIEWS[face] = cls(face)
        return view

    def status(self) -> RawJSON:
        """The status command's result, encoded (a status request: passes keep running a while)."""
        now = time.monotonic()
        self.sampler.watch(now)
        guests = self.fresh(now)
        rows = ", ".join([self._row(g) for g in guests])
        if len(self._rows) > len(guests):
            live = {g.domid for g in guests}
            self._rows = {d: r for d, r in self._rows.items() if d in live}
        return RawJSON(f'{{"daemon": {json.dumps(asdict(self.face.about()))}, "guests": [{rows}]}}')

    def fresh(self, now: float) -> list[GuestInfo]:
        """Every guest, after a sample pass if the last one is older than the window (else
        after measuring only workers started since)."""
        guests = self.face.guests()
        if self.sampler.stale(now):
            self.sampler.sample(guests, self.face.observe_cpu, now)
        elif not self.sampler.top_up(guests, self.face.observe_cpu, now):
            return guests
        return self.face.guests()        # CPU seconds read went into the tallies

    def due(self, now: float) -> float | None:
        """When the supervisor's loop should call :meth:`tick` (None: nobody watches)."""
        return self.sampler.due(now)

    def tick(self, now: float) -> None:
        """From the supervisor's loop: the next pass, if it is due."""
        due = self.sampler.due(now)
        if due is not None and now >= due:
            self.sampler.sample(self.face.guests(), self.face.observe_cpu, now)

    def _row(self, g: GuestInfo) -> str:
        fig = self.sampler.figures(g.domid)
        key = (g.state, g.pid, g.adopted, g.restarts, g.last_exit, g.name, g.report, g.totals, g.interrupts, fig)
        kept = self._rows.get(g.domid)
        if kept is None or kept[0] != key:
            row = guest_dict(g, fig)
            del row["heartbeat_age"]
            kept = self._rows[g.domid] = (key, json.dumps(row)[:-1])
        return f'{kept[1]}, "heartbeat_age": {json.dumps(g.heartbeat_age)}}}'


def guest_dict(g: GuestInfo, fig: Figures | None = None) -> dict:
    """One guest as ``status --json`` shows it (its counters over all its workers);
    ``fig``: its worker's process figures (rss, uss, CPU percent)."""
    r, t = g.report, g.totals or Totals()
    out = {"domid": g.domid, "name": g.name, "worker_state": g.state.value, "pid": g.pid, "adopted": g.adopted,
           "restarts": g.restarts, "last_exit": g.last_exit,
           "xenbus_state": r.xenbus_state if r else None, "connected": r.connected if r else False,
           "served": dict(t.served), "misses": _copy(t.misses), "errors": _copy(t.errors),
           "cpu_seconds": t.cpu_seconds if g.totals else None,
           "cpu_percent": fig.cpu_percent if fig and g.pid else None,
           "cpu_window": fig.cpu_window if fig and g.pid else None,
           "latency_us": r.latency_us.to_dict() if r and r.latency_us else None,
           "devices": [d.to_dict() for d in g.devices], "heartbeat_age": g.heartbeat_age}
    if fig is not None and fig.rss is not None and g.pid:
        out.update(rss=fig.rss, uss=fig.uss)
    return out


def _copy(by_op: dict) -> dict:
    return {op: dict(codes) for op, codes in by_op.items()}
