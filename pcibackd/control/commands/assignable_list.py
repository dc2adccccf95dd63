"""List the assignable pool, one function a line (-n: with its name), like xl pci-assignable-list.

--json gives everything: original driver, bound driver, present, held by.

  {"command": "assignable-list", "args": {"names": false}}
"""

from __future__ import annotations

from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace

NAME = "assignable-list"
ARGS = (Arg("names", bool, "show each function's name", flags=("-n", "--names")),)


def execute(face: DaemonFace, args: dict) -> dict:
    return {"names": args["names"], "functions": face.lifecycle.list_pool()}


def render(result: dict) -> str:
    lines = []
    for f in result["functions"]:
        line = f["bdf"] + (f" {f['name'] or ''}" if result["names"] else "")
        notes = [] if f["present"] else ["missing from the host"]
        if f["held_by"] is not None:
            notes.append(f"held by domain {f['held_by']}")
        lines.append(line.rstrip() + (f"  ({', '.join(notes)})" if notes else ""))
    return "\n".join(lines)
