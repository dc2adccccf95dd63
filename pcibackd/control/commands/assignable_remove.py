"""Take a function out of the assignable pool (out of quarantine, off the stub driver).

Like ``xl pci-assignable-remove``: -r rebinds the driver it had before it
joined the pool; without -r it stays driverless.  Refused while a guest holds it.

  {"command": "assignable-remove", "args": {"bdf": "0000:03:00.0", "rebind": true}}
"""

from __future__ import annotations

from pcibackd.control.commands import devcmd
from pcibackd.control.commands.base import Arg
from pcibackd.control.face import DaemonFace

NAME = "assignable-remove"
ARGS = (Arg("bdf", str, "host PCI address", metavar="BDF"),
        Arg("rebind", bool, "give it back to its original dom0 driver", flags=("-r", "--rebind")))


def execute(face: DaemonFace, args: dict) -> dict:
    return devcmd.run(face.lifecycle.remove, devcmd.bdf(args["bdf"]), args["rebind"])


def render(result: dict) -> str:
    return f"{result['bdf']} removed from the pool ({result['note']})"
