"""Show the daemon and every guest: worker, xenbus state, memory, CPU, ops, latency, devices.

Daemon: version, pid, uptime, platform (sim|xen), xenstore, topology (vpci|passthrough).
Per guest: domid, xenbus state, worker state (STARTING RUNNING BACKOFF STOPPING
EXITED FATAL), worker pid, restarts, RSS and USS, CPU (percent since the previous
status, or since the worker started), ops served by type, errors by code, op
latency p50/p99 (microseconds, from the worker), devices (host BDF -> guest BDF).
"-" means not known (no worker, or no data yet).

  {"command": "status", "args": {}}
"""

from __future__ import annotations

import time

from ..table import counts, dash, duration, micros, size, table, xenbus_name

NAME = "status"
ARGS = ()


USS_TTL = 2.0     # seconds; USS walks every mapping of the worker (~0.7 ms each), RSS is cheap


class ProcSampler:
    """psutil figures of each worker.  CPU percent is measured between two
    status calls (psutil's cpu_percent needs one Process object kept across
    calls); RSS, USS and CPU seconds are filled in only when the supervisor's
    status lacks them, USS at most every USS_TTL seconds."""

    def __init__(self):
        self.procs: dict[int, object] = {}
        self.uss: dict[int, tuple[float, int]] = {}
        self.cpu: dict[int, tuple[float, float]] = {}

    def fill(self, g: dict, now: float) -> None:
        pid = g.get("pid")
        if pid and not all(k in g for k in ("rss", "uss", "cpu_seconds")):
            g.update(self._measure(pid, now))
        g["cpu_percent"] = self._percent(pid, g.get("cpu_seconds"), now)

    def _measure(self, pid: int, now: float) -> dict:
        import psutil
        try:
            p = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
            with p.oneshot():
                out = {"rss": p.memory_info().rss, "cpu_seconds": round(sum(p.cpu_times()[:2]), 3)}
                at, uss = self.uss.get(pid, (0.0, 0))
                if now - at >= USS_TTL:
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
        import psutil
        try:
            age = time.time() - psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        return round(100 * cpu_seconds / age, 1) if age > 0 else None

    def forget_others(self, pids: set) -> None:
        for table in (self.procs, self.uss, self.cpu):
            for pid in set(table) - pids:
                del table[pid]


_procs = ProcSampler()


def execute(sup, args: dict) -> dict:
    st = sup.status()
    now = time.monotonic()
    for g in st["guests"]:
        _procs.fill(g, now)
        g.setdefault("latency_us", None)     # {"p50", "p99", ...} once workers report it
    _procs.forget_others({g["pid"] for g in st["guests"]})
    control = getattr(sup, "control", None)
    st["daemon"]["control"] = getattr(control, "endpoints", None)
    return st


def _latency(g: dict, key: str) -> str:
    lat = g.get("latency_us") or {}
    return dash(lat.get(key), micros)


def render(result: dict) -> str:
    d = result["daemon"]
    guests = result["guests"]
    head = (f"pcibackd {d['version']} (pid {d['pid']}), up {duration(d['uptime'])}, platform {d['platform']}, "
            f"topology {d['topology']}, xenstore {d['xenstore']}\n{len(guests)} guest(s)")
    if not guests:
        return head
    rows, detail = [], []
    for g in guests:
        devs = "\n".join(f"{x['bdf']} -> {x['vbdf']}" + (" (permissive)" if x.get("permissive") else "")
                         for x in g.get("devices", [])) or "-"
        rows.append([g["domid"], xenbus_name(g.get("xenbus_state")), g["worker_state"], dash(g.get("pid")),
                     g["restarts"], dash(g.get("rss"), size), dash(g.get("uss"), size),
                     dash(g.get("cpu_percent"), lambda v: f"{v:.1f}%"), sum(g.get("served", {}).values()),
                     sum(g.get("errors", {}).values()), _latency(g, "p50"), _latency(g, "p99"), devs])
        detail.append([g["domid"], counts(g.get("served", {})), counts(g.get("errors", {})),
                       g.get("last_exit") or "-"])
    return "\n\n".join([head,
                        table(["DOMID", "XENBUS", "WORKER", "PID", "RESTARTS", "RSS", "USS", "CPU", "OPS", "ERRORS",
                               "P50", "P99", "DEVICES (host -> guest)"], rows),
                        table(["DOMID", "OPS BY TYPE", "ERRORS BY CODE", "LAST EXIT"], detail)])
