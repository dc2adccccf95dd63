"""List the assignable PCI devices of this host and which guest holds each.

Assignable: bound to pciback or pci-stub on a Xen dom0; every simulated
function on the simulated platform.  HELD BY is the domid, "-" when free.

  {"command": "devices", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.face import DaemonFace
from pcibackd.control.table import dash, table

NAME = "devices"
ARGS = ()


def execute(face: DaemonFace, args: dict) -> list[dict]:
    held = {d.bdf: g.domid for g in face.guests() for d in g.devices}
    return [{"bdf": str(b), "held_by": held.get(b)} for b in face.assignable()]


def render(result: list[dict]) -> str:
    return table(["BDF", "HELD BY"], [[d["bdf"], dash(d.get("held_by"))] for d in result])
