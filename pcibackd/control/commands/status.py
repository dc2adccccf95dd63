"""Show the daemon and every guest: worker, xenbus state, memory, CPU, ops, latency, devices.

Daemon: version, pid, uptime, platform (sim|xen), xenstore, topology (vpci|passthrough).
Per guest: domid, xenbus state, worker state (STARTING RUNNING BACKOFF STOPPING
EXITED FATAL), worker pid, restarts, RSS and USS, CPU (percent since the previous
status, or since the worker started), ops served by type, errors by code, op
latency p50/p99 (microseconds, from the worker), devices (host BDF -> guest BDF),
and per function its interrupts as the supervisor's broker holds them: the MSI
PIRQ, the MSI-X entry=PIRQ pairs ("off" when not enabled), whether MSI-X is
prepared (PHYSDEVOP_prepare_msix), and the last interrupt error by symbolic
names (the op, what the guest got, the broker's refusal behind it).
"-" means not known (no worker, or no data yet).

  {"command": "status", "args": {}}
"""

from __future__ import annotations

import time
from dataclasses import asdict

from pcibackd.control.face import DaemonFace
from pcibackd.control.procstats import ProcSampler
from pcibackd.control.table import counts, dash, duration, micros, size, table, xenbus_name
from pcibackd.daemon.views import GuestInfo

NAME = "status"
ARGS = ()

_procs = ProcSampler()


def execute(face: DaemonFace, args: dict) -> dict:
    now = time.monotonic()
    guests = [_guest(g) for g in face.guests()]
    for g in guests:
        _procs.fill(g, now)
    _procs.forget_others({g["pid"] for g in guests})
    return {"daemon": asdict(face.about()), "guests": guests}


def _guest(g: GuestInfo) -> dict:
    """One guest as ``status --json`` shows it (its worker's report flattened in)."""
    r = g.report
    return {"domid": g.domid, "worker_state": g.state.value, "pid": g.pid, "adopted": g.adopted,
            "restarts": g.restarts, "last_exit": g.last_exit,
            "xenbus_state": r.xenbus_state if r else None, "connected": r.connected if r else False,
            "served": dict(r.served) if r else {}, "errors": dict(r.errors) if r else {},
            "latency_us": r.latency_us.to_dict() if r and r.latency_us else None,
            "devices": [d.to_dict() for d in g.devices], "heartbeat_age": g.heartbeat_age}


def _latency(g: dict, key: str) -> str:
    lat = g.get("latency_us") or {}
    return dash(lat.get(key), micros)


def _interrupts(dev: dict) -> tuple[str, str, str, str]:
    msi = dev.get("msi")
    msix = dev.get("msix") or {}
    err = dev.get("irq_error")
    return (f"pirq {msi}" if msi is not None else "off",
            " ".join(f"{entry}={pirq}" for entry, pirq in sorted(msix.items(), key=lambda kv: int(kv[0]))) or "off",
            "yes" if dev.get("msix_prepared") else "no",
            f"{err['op']} {err['error']}" + (f" ({err['cause']})" if err["cause"] else "") if err else "-")


def render(result: dict) -> str:
    d = result["daemon"]
    guests = result["guests"]
    head = (f"pcibackd {d['version']} (pid {d['pid']}), up {duration(d['uptime'])}, platform {d['platform']}, "
            f"topology {d['topology']}, xenstore {d['xenstore']}\n{len(guests)} guest(s)")
    if not guests:
        return head
    rows, detail, irqs = [], [], []
    for g in guests:
        irqs.extend([g["domid"], x["bdf"], *_interrupts(x)] for x in g.get("devices", []))
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
                        table(["DOMID", "OPS BY TYPE", "ERRORS BY CODE", "LAST EXIT"], detail),
                        table(["DOMID", "FUNCTION", "MSI", "MSI-X (entry=pirq)", "PREPARED", "LAST IRQ ERROR"],
                              irqs or [["-"] * 6])])
