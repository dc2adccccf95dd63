"""Per-worker memory figures for pcibackctl status (psutil): RSS and USS.

CPU is not measured here: workers report their CPU time in every heartbeat, and
the supervisor keeps it over all of a guest's workers (daemon/tally.py), so the
figure does not depend on who asked last.
"""

from __future__ import annotations

import psutil

USS_TTL = 2.0     # seconds; USS walks every mapping of the worker (~0.7 ms each), RSS is cheap
USS_PER_CALL = 16     # USS walks per status call: its cost stays bounded at any number of guests


class ProcSampler:
    """psutil figures of each worker; USS is measured at most every USS_TTL seconds,
    and for at most USS_PER_CALL workers per call (the others show their last figure)."""

    def __init__(self):
        self.procs: dict[int, object] = {}
        self.uss: dict[int, tuple[float, int]] = {}
        self._call, self._walks = None, 0       # the status call being filled (its `now`), USS walks in it

    def fill(self, g: dict, now: float) -> None:
        pid = g.get("pid")
        if pid:
            g.update(self._measure(pid, now))

    def _measure(self, pid: int, now: float) -> dict:
        try:
            p = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
            with p.oneshot():
                out = {"rss": p.memory_info().rss}
                if self._call != now:
                    self._call, self._walks = now, 0
                at, uss = self.uss.get(pid, (0.0, None))
                if now - at >= USS_TTL and self._walks < USS_PER_CALL:
                    self._walks += 1
                    at, uss = self.uss[pid] = (now, p.memory_full_info().uss)
                out["uss"] = uss
            return out
        except psutil.Error:
            return {}

    def forget_others(self, pids: set) -> None:
        for table in (self.procs, self.uss):
            for pid in set(table) - pids:
                del table[pid]
