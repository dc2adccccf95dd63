"""Per-worker process figures for pcibackctl status (psutil): RSS, USS, CPU."""

from __future__ import annotations

import time

import psutil

USS_TTL = 2.0     # seconds; USS walks every mapping of the worker (~0.7 ms each), RSS is cheap
USS_PER_CALL = 16     # USS walks per status call: its cost stays bounded at any number of guests


class ProcSampler:
    """psutil figures of each worker.  CPU percent is measured between two
    status calls (psutil's cpu_percent needs one Process object kept across
    calls); USS is measured at most every USS_TTL seconds, and for at most
    USS_PER_CALL workers per call (the others show their last figure)."""

    def __init__(self):
        self.procs: dict[int, object] = {}
        self.uss: dict[int, tuple[float, int]] = {}
        self.cpu: dict[int, tuple[float, float]] = {}
        self._call, self._walks = None, 0       # the status call being filled (its `now`), USS walks in it

    def fill(self, g: dict, now: float) -> None:
        pid = g.get("pid")
        if pid:
            g.update(self._measure(pid, now))
        g["cpu_percent"] = self._percent(pid, g.get("cpu_seconds"), now)

    def _measure(self, pid: int, now: float) -> dict:
        try:
            p = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
            with p.oneshot():
                out = {"rss": p.memory_info().rss, "cpu_seconds": round(sum(p.cpu_times()[:2]), 3)}
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

    def _percent(self, pid: int | None, cpu_seconds: float | None, now: float) -> float | None:
        if pid is None or cpu_seconds is None:
            return None
        prev = self.cpu.get(pid)
        self.cpu[pid] = (now, cpu_seconds)
        if prev is not None and now - prev[0] > 0.05:
            return round(max(0.0, 100 * (cpu_seconds - prev[1]) / (now - prev[0])), 1)
        return self._lifetime(pid, cpu_seconds)

    @staticmethod
    def _lifetime(pid: int, cpu_seconds: float) -> float | None:
        try:
            age = time.time() - psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        return round(100 * cpu_seconds / age, 1) if age > 0 else None

    def forget_others(self, pids: set) -> None:
        for table in (self.procs, self.uss, self.cpu):
            for pid in set(table) - pids:
                del table[pid]
