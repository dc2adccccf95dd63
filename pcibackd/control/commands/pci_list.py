"""List a guest's PCI functions, like xl pci-list: index, virtual address, host address, state.

  {"command": "pci-list", "args": {"domain": "guest1"}}
"""

from __future__ import annotations

from pcibackd.control.commands import devcmd
from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace
from pcibackd.control.table import dash, table

NAME = "pci-list"
ARGS = (Arg("domain", str, "domid or name", metavar="DOMAIN"),)


def execute(face: DaemonFace, args: dict) -> dict:
    return devcmd.run(face.lifecycle.pci_list, args["domain"])


def render(result: dict) -> str:
    rows = [[d["index"], dash(d["vdev"]), dash(d["dev"]), dash(d["state"]), dash(d["name"])]
            for d in result["devices"]]
    return table(["ID", "VDEV", "DEVICE", "STATE", "NAME"], rows)
