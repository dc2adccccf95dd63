"""Make a host function assignable: take it from its dom0 driver, bind the stub, quarantine it.

Like ``xl pci-assignable-add``.  The pool is kept under the daemon's state_dir
with the function's original driver (``assignable-remove -r`` rebinds it).  A
function dom0 is using (a mounted disk's controller, the NIC with the default
route) is refused unless --force.

  {"command": "assignable-add", "args": {"bdf": "0000:03:00.0", "name": "", "force": false}}
"""

from __future__ import annotations

from pcibackd.control.commands import devcmd
from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace

NAME = "assignable-add"
ARGS = (Arg("bdf", str, "host PCI address", metavar="BDF"),
        Arg("name", str, "a name for it (assignable-list -n)", metavar="NAME", flags=("-n", "--name")),
        Arg("force", bool, "take it even if dom0 uses it", flags=("--force",)))


def execute(face: DaemonFace, args: dict) -> dict:
    return devcmd.run(face.lifecycle.add, devcmd.bdf(args["bdf"]), args["name"] or None, args["force"])


def render(result: dict) -> str:
    return f"{result['bdf']} is assignable ({result['note']})"
