"""Turn permissive config-space mode on or off for one assigned device.

Permissive lets the guest write registers no rule covers (like xen-pciback's
permissive flag; unsafe, see xl-pci-configuration(5)).  BARs, the COMMAND
decode bits, bridge routing and MSI messages stay protected.  BDF is the host
address (dddd:bb:dd.f or bb:dd.f).  Exit 6 when no guest holds BDF.

  {"command": "permissive", "args": {"mode": "on", "bdf": "0000:00:05.0"}}
"""

from __future__ import annotations

from pcibackd.control.commands.base import Arg, CommandError, fan_out
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno
from pcibackd.daemon.states import WorkerState
from pcibackd.wire.bdf import BDF

NAME = "permissive"
ARGS = (Arg("mode", str, "on or off", choices=("on", "off"), metavar="on|off"),
        Arg("bdf", str, "host PCI address of an assigned device", metavar="BDF"))


def execute(face: DaemonFace, args: dict):
    try:
        bdf = BDF.parse(args["bdf"])
    except ValueError as exc:
        raise CommandError(Errno.BAD_ARGUMENTS, str(exc)) from None
    holder = next((g for g in face.guests() if any(d.bdf == bdf for d in g.devices)), None)
    if holder is None:
        raise CommandError(Errno.NOT_FOUND, f"{bdf} is not assigned to any guest")
    if holder.state is not WorkerState.RUNNING:
        raise CommandError(Errno.COMMAND_FAILED, f"the worker of domain {holder.domid} is "
                                                 f"{holder.state.value}; try again when it is RUNNING")
    on = args["mode"] == "on"
    return fan_out([holder.domid], "permissive", {"bdf": str(bdf), "on": on}, "permissive",
                   lambda rs: {"bdf": str(bdf), "domid": holder.domid, "permissive": on})


def render(result: dict) -> str:
    return (f"permissive {'on' if result['permissive'] else 'off'} for {result['bdf']} "
            f"(domain {result['domid']})")
