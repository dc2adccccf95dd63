"""List the assignable PCI devices of this host and which guest holds each.

Assignable: bound to pciback or pci-stub on a Xen dom0; every simulated
function on the simulated platform.  HELD BY is the domid, "-" when free.

  {"command": "devices", "args": {}}
"""

from __future__ import annotations

from pcibackd.control.table import dash, table

NAME = "devices"
ARGS = ()


def execute(sup, args: dict) -> list[dict]:
    return sup.devices()


def render(result: list[dict]) -> str:
    return table(["BDF", "HELD BY"], [[d["bdf"], dash(d.get("held_by"))] for d in result])
