"""Control commands: name -> (handler, argument spec).  The docstring of each
handler is its ``pcibackctl <command> --help`` text."""

from __future__ import annotations

from .protocol import Errno


class CommandError(Exception):
    def __init__(self, errno: Errno, reason: str):
        super().__init__(reason)
        self.errno, self.reason = errno, reason


def cmd_status(sup, args: dict):
    """Show the daemon and, per guest, worker state, xenbus state, ops and devices."""
    return sup.status()


def cmd_list(sup, args: dict):
    """List guests and the devices each one is given (host BDF -> guest BDF)."""
    return [{"domid": g["domid"], "devices": g["devices"]} for g in sup.status()["guests"]]


def cmd_restart(sup, args: dict):
    """Replace the worker of guest DOMID (also revives a FATAL one)."""
    domid = args.get("domid")
    if not isinstance(domid, int) or isinstance(domid, bool):
        raise CommandError(Errno.BAD_ARGUMENTS, "domid must be an integer")
    if not sup.restart_worker(domid):
        raise CommandError(Errno.NOT_FOUND, f"no guest with domid {domid}")
    return {"domid": domid}


COMMANDS = {
    "status": (cmd_status, {}),
    "list": (cmd_list, {}),
    "restart": (cmd_restart, {"domid": int}),
}
