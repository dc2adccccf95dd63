"""Replace the worker of guest DOMID with a fresh one (also revives a FATAL guest).

The old worker is killed; the new one resumes the guest's connection and
devices, serving an op left pending.  Exit 6 when DOMID has no PCI backend.

  {"command": "restart", "args": {"domid": 3}}
"""

from __future__ import annotations

from pcibackd.control.commands.base import Arg, CommandError
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno

NAME = "restart"
ARGS = (Arg("domid", int, "guest domain id", metavar="DOMID"),)
MAX_DOMID = 0x7FEF      # DOMID_FIRST_RESERVED - 1


def execute(face: DaemonFace, args: dict) -> dict:
    domid = args["domid"]
    if not 0 < domid <= MAX_DOMID:
        raise CommandError(Errno.BAD_ARGUMENTS, f"domid must be 1..{MAX_DOMID}")
    if not face.restart(domid):
        raise CommandError(Errno.NOT_FOUND, f"no guest with domid {domid}")
    return {"domid": domid}


def render(result: dict) -> str:
    return f"restarting the worker of domain {result['domid']}"
