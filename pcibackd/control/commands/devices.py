"""List the assignable PCI devices of this host, which guest holds each, and how its last reset went.

Assignable: bound to pciback or pci-stub on a Xen dom0; every simulated
function on the simulated platform.  HELD BY is the domid, "-" when free.
LAST RESET is the method the last release used ("none": the function has
no reset method) and its result, "at seize" when it was the reset the daemon
did as it took the function from dom0.  QUARANTINED "yes": that reset failed, and
no guest gets the function until ``pcibackctl quarantine clear --force BDF``
(or until it resets fine as it joins the pool again).

  {"command": "devices", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.face import DaemonFace
from pcibackd.control.table import dash, table

NAME = "devices"
ARGS = ()


def _reset(record) -> dict | None:
    if record is None:
        return None
    return {"method": record.method, "result": record.result, "detail": record.detail,
            "restored": len(record.restored), "restore_error": record.restore_error, "when": record.when,
            "event": record.event}


def execute(face: DaemonFace, args: dict) -> list[dict]:
    held = {d.bdf: g.domid for g in face.guests() for d in g.devices}
    releases = face.releases()
    bdfs = list(face.assignable())
    bdfs += sorted(b for b, (_, quarantined) in releases.items() if quarantined and b not in bdfs)
    out = []
    for b in bdfs:
        record, quarantined = releases.get(b, (None, False))
        out.append({"bdf": str(b), "held_by": held.get(b), "reset": _reset(record), "quarantined": quarantined})
    return out


def _last_reset(reset: dict | None) -> str:
    if reset is None:
        return "-"
    return f"{reset['method']} {reset['result']}" + (" at seize" if reset.get("event") == "seize" else "")


def render(result: list[dict]) -> str:
    return table(["BDF", "HELD BY", "LAST RESET", "QUARANTINED"],
                 [[d["bdf"], dash(d.get("held_by")), _last_reset(d.get("reset")),
                   "yes" if d.get("quarantined") else "-"] for d in result])
