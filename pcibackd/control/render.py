"""Human-readable renderings of control replies (one function per command)."""

from __future__ import annotations

from ..xen.pciif import XenbusState


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _state_name(n) -> str:
    try:
        return XenbusState(n).name
    except (ValueError, TypeError):
        return "-"


def render_status(result: dict) -> str:
    d = result["daemon"]
    head = (f"pcibackd {d['version']}  pid {d['pid']}  up {d['uptime']} s  platform {d['platform']}  "
            f"topology {d['topology']}  xenstore {d['xenstore']}")
    rows = []
    for g in result["guests"]:
        served = sum(g["served"].values())
        errors = ",".join(f"{k}={v}" for k, v in sorted(g["errors"].items())) or "0"
        devs = ", ".join(f"{x['bdf']}->{x['vbdf']}" for x in g["devices"]) or "-"
        rss = f"{g['rss'] // 1024} KiB" if g.get("rss") else "-"
        rows.append([g["domid"], _state_name(g["xenbus_state"]), g["worker_state"], g["pid"] or "-",
                     g["restarts"], served, errors, rss, devs])
    return head + "\n" + _table(["DOMID", "XENBUS", "WORKER", "PID", "RESTARTS", "OPS", "ERRORS (by code)", "RSS",
                                 "DEVICES (host->guest)"], rows)


def render_list(result: list) -> str:
    rows = [[g["domid"], d["bdf"], d["vbdf"]] for g in result for d in g["devices"]]
    return _table(["DOMID", "HOST BDF", "GUEST BDF"], rows)


RENDERERS = {"status": render_status, "list": render_list,
             "restart": lambda r: f"worker of domain {r['domid']} restarted"}
