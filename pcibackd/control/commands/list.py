"""List guests (domid and domain name) and the devices each one is given (host BDF -> guest BDF).

  {"command": "list", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.face import DaemonFace
from pcibackd.control.table import table, xenbus_name

NAME = "list"
ARGS = ()


def execute(face: DaemonFace, args: dict) -> list[dict]:
    return [{"domid": g.domid, "name": g.name, "worker_state": g.state.value,
             "xenbus_state": g.report.xenbus_state if g.report else None,
             "devices": [{"bdf": str(d.bdf), "vbdf": str(d.vbdf)} for d in g.devices]}
            for g in face.guests()]


def render(result: list[dict]) -> str:
    rows = []
    for g in result:
        for d in g["devices"] or [{"bdf": "-", "vbdf": "-"}]:
            rows.append([g["domid"], g.get("name") or "-", g["worker_state"], xenbus_name(g["xenbus_state"]),
                         d["bdf"], d["vbdf"]])
    return table(["DOMID", "NAME", "WORKER", "XENBUS", "HOST BDF", "GUEST BDF"], rows)
