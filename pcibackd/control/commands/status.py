"""Show the daemon and every guest: worker, xenbus state, memory, CPU, ops, misses, errors, latency, devices.

Daemon: version, pid, uptime, platform (sim|xen), topology (vpci|passthrough),
and the xenstore connection (connected or DISCONNECTED).
Per guest: domid and domain name, xenbus state, worker state (STARTING RUNNING
BACKOFF STOPPING EXITED FATAL), worker pid, restarts, RSS and USS, CPU (seconds
used by all the guest's workers, and percent of one CPU over the supervisor's
last sampling window: 10 s while status is being asked, else the time since
the previous sample or the worker's start; --json: cpu_window), ops served,
probe misses, errors, op latency p50/p99 (microseconds, the current worker's
last 1024 ops), and the last exit.  Process figures are sampled by the
supervisor from /proc at most every 10 s (USS of a few workers per sample).

Counters add up all the workers a guest had: a restart does not reset them
(what a dying worker counted after its last heartbeat, at most one heartbeat
interval, is lost).  Probe misses are answers a healthy guest asks for:
dev_not_found for empty slots it enumerates (or a function being unplugged),
and invalid_offset for the extended-config-space probe at 0x100 of a
conventional function.  Errors are every other failed answer, by symbolic
code (XEN_PCI_ERR_*, or -E... for enable_msix).

Per function: host and guest address, permissive, denied writes (guest writes
dropped or refused, over all workers), and its interrupts as the supervisor's
broker holds them: the MSI PIRQ, the MSI-X entry=PIRQ pairs ("off" when not
enabled), whether MSI-X is prepared (PHYSDEVOP_prepare_msix), and the last
interrupt error by symbolic names (the op, what the guest got, the broker's
refusal behind it).  "-" means not known (no worker, or no data yet).

  {"command": "status", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.face import DaemonFace
from pcibackd.control.statusview import StatusView
from pcibackd.control.table import counts, dash, duration, micros, size, table, xenbus_name
from pcibackd.daemon.tally import Totals

NAME = "status"
ARGS = ()


def execute(face: DaemonFace, args: dict) -> dict:
    return StatusView.of(face).status()


def _latency(g: dict, key: str) -> str:
    lat = g.get("latency_us") or {}
    return dash(lat.get(key), micros)


def _seconds(v: float) -> str:
    return f"{v:.2f}s" if v < 10 else f"{v:.1f}s" if v < 600 else duration(v)


def _msi(dev: dict) -> str:
    msi = dev.get("msi")
    return f"pirq {msi}" if msi is not None else "off"


def _msix(dev: dict) -> str:
    msix = dev.get("msix") or {}
    return " ".join(f"{entry}={pirq}" for entry, pirq in sorted(msix.items(), key=lambda kv: int(kv[0]))) or "off"


def _irq_error(dev: dict) -> str:
    err = dev.get("irq_error")
    return f"{err['op']} {err['error']}" + (f" ({err['cause']})" if err["cause"] else "") if err else "-"


# The per-function table: (header, cell of one device dict); a new device field is one more row here.
DEVICE_COLUMNS = (
    ("FUNCTION", lambda d: d["bdf"]),
    ("GUEST", lambda d: d["vbdf"]),
    ("PERMISSIVE", lambda d: "yes" if d.get("permissive") else "no"),
    ("DENIED", lambda d: dash(d.get("denied_writes"))),
    ("MSI", _msi),
    ("MSI-X (entry=pirq)", _msix),
    ("PREPARED", lambda d: "yes" if d.get("msix_prepared") else "no"),
    ("LAST IRQ ERROR", _irq_error),
)


def header(d: dict) -> str:
    """The daemon's lines (shared with the metrics command's text)."""
    xs = "connected" if d.get("xenstore_connected") else "DISCONNECTED (guest changes are not seen)"
    return (f"pcibackd {d['version']} (pid {d['pid']}), up {duration(d['uptime'])}, platform {d['platform']}, "
            f"topology {d['topology']}\nxenstore {d['xenstore']}: {xs}")


def render(result: dict) -> str:
    guests = result["guests"]
    head = f"{header(result['daemon'])}\n{len(guests)} guest(s)"
    if not guests:
        return head
    windows = sorted({g["cpu_window"] for g in guests if g.get("cpu_percent") is not None and g.get("cpu_window")})
    if windows:
        head += (f"\nCPU%: of one CPU over the last {duration(windows[-1])}" +
                 (" (less for workers started since)" if len(windows) > 1 else ""))
    rows, detail, devices = [], [], []
    for g in guests:
        devices.extend([g["domid"], *(cell(x) for _, cell in DEVICE_COLUMNS)] for x in g.get("devices", []))
        misses, errors = Totals.summed(g.get("misses", {})), Totals.summed(g.get("errors", {}))
        rows.append([g["domid"], g.get("name") or "-", xenbus_name(g.get("xenbus_state")), g["worker_state"],
                     dash(g.get("pid")), g["restarts"], dash(g.get("rss"), size), dash(g.get("uss"), size),
                     dash(g.get("cpu_seconds"), _seconds),
                     dash(g.get("cpu_percent"), lambda v: f"{v:.1f}%"), sum(g.get("served", {}).values()),
                     sum(misses.values()), sum(errors.values()), _latency(g, "p50"), _latency(g, "p99")])
        detail.append([g["domid"], counts(g.get("served", {})), counts(misses), counts(errors),
                       g.get("last_exit") or "-"])
    return "\n\n".join([head,
                        table(["DOMID", "NAME", "XENBUS", "WORKER", "PID", "RESTARTS", "RSS", "USS", "CPU", "CPU%",
                               "OPS", "MISSES", "ERRORS", "P50", "P99"], rows),
                        table(["DOMID", "OPS BY TYPE", "MISSES BY CODE", "ERRORS BY CODE", "LAST EXIT"], detail),
                        table(["DOMID", *(h for h, _ in DEVICE_COLUMNS)],
                              devices or [["-"] * (len(DEVICE_COLUMNS) + 1)])])
