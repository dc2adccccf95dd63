"""Hand a quarantined device out again (its last reset failed); needs --force.

A function whose reset failed may still hold its last guest's data or be
wedged; the daemon gives it to no guest until this clears it.  Say --force to
confirm.  Exit 6 when BDF is not quarantined.

  {"command": "quarantine-clear", "args": {"bdf": "0000:00:05.0", "force": true}}
"""

from __future__ import annotations

from pcibackd.control.commands.base import Arg, CommandError
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno
from pcibackd.wire.bdf import BDF

NAME = "quarantine-clear"
WORDS = ("quarantine", "clear")
ARGS = (Arg("bdf", str, "host PCI address of a quarantined device", metavar="BDF"),
        Arg("force", bool, "confirm: the device may be in an unknown state"))


def execute(face: DaemonFace, args: dict) -> dict:
    try:
        bdf = BDF.parse(args["bdf"])
    except ValueError as exc:
        raise CommandError(Errno.BAD_ARGUMENTS, str(exc)) from None
    record, quarantined = face.releases().get(bdf, (None, False))
    if not quarantined:
        raise CommandError(Errno.NOT_FOUND, f"{bdf} is not quarantined")
    if not args["force"]:
        raise CommandError(Errno.BAD_ARGUMENTS, f"{bdf} is quarantined because its last reset failed "
                                                f"({record.describe()}); --force hands it out anyway")
    if not face.clear_quarantine(bdf):
        raise CommandError(Errno.NOT_FOUND, f"{bdf} is not quarantined")
    return {"bdf": str(bdf), "method": record.method, "detail": record.detail}


def render(result: dict) -> str:
    return f"{result['bdf']}: quarantine cleared (its {result['method']} reset had failed)"
