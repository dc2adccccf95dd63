"""Control commands: name -> (handler, argument spec).  The docstring of each
handler is its ``pcibackctl <command> --help`` text.  A handler returns the
result, raises :class:`CommandError`, or returns a ``Pending`` when workers
must answer (the reply waits for them, bounded by a timeout)."""

from __future__ import annotations

from ..pcihost.bdf import BDF
from .protocol import Errno


class CommandError(Exception):
    def __init__(self, errno: Errno, reason: str):
        super().__init__(reason)
        self.errno, self.reason = errno, reason


def _pending(*a, **k):
    from .server import Pending
    return Pending(*a, **k)


def _arg(args: dict, name: str, typ: type):
    value = args.get(name)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CommandError(Errno.BAD_ARGUMENTS, f"{name} must be {'an integer' if typ is int else 'a string'}")
    return value


def cmd_status(sup, args: dict):
    """Show the daemon and, per guest, worker state, xenbus state, ops and devices."""
    return sup.status()


def cmd_list(sup, args: dict):
    """List guests and the devices each one is given (host BDF -> guest BDF)."""
    return [{"domid": g["domid"], "devices": g["devices"]} for g in sup.status()["guests"]]


def cmd_restart(sup, args: dict):
    """Replace the worker of guest DOMID (also revives a FATAL one)."""
    domid = _arg(args, "domid", int)
    if not sup.restart_worker(domid):
        raise CommandError(Errno.NOT_FOUND, f"no guest with domid {domid}")
    return {"domid": domid}


def _holder(sup, bdf: BDF) -> int | None:
    for g in sup.status()["guests"]:
        if any(d["bdf"] == str(bdf) for d in g["devices"]):
            return g["domid"]
    return None


def _worker_results(what: str):
    def finish(replies: dict) -> dict:
        bad = {d: r.get("result") for d, r in replies.items() if not r.get("ok")}
        if bad or not replies:
            raise CommandError(Errno.COMMAND_FAILED, f"{what} failed: " +
                               (", ".join(f"dom{d}: {r}" for d, r in bad.items()) or "no worker answered"))
        return {f"dom{d}": r.get("result") for d, r in replies.items()}
    return finish


def cmd_permissive(sup, args: dict):
    """Turn permissive config-space mode on or off for one assigned device:
    pcibackctl permissive on|off BDF.  Permissive lets the guest write registers
    no rule covers (unsafe: see xl-pci-configuration(5))."""
    mode = _arg(args, "mode", str)
    if mode not in ("on", "off"):
        raise CommandError(Errno.BAD_ARGUMENTS, "mode must be on or off")
    try:
        bdf = BDF.parse(_arg(args, "bdf", str))
    except ValueError as exc:
        raise CommandError(Errno.BAD_ARGUMENTS, str(exc)) from None
    domid = _holder(sup, bdf)
    if domid is None:
        raise CommandError(Errno.NOT_FOUND, f"{bdf} is not assigned to any guest")
    return _pending([(domid, "permissive", {"bdf": str(bdf), "on": mode == "on"})],
                    _worker_results("permissive"))


def cmd_policy_reload(sup, args: dict):
    """Re-read the config-space policy file (permissive, quirks) in every worker.
    The file is checked first; a malformed file changes nothing."""
    from ..confspace import PolicyError, PolicyStore
    try:
        PolicyStore(sup.cfg.policy_path)
    except PolicyError as exc:
        raise CommandError(Errno.COMMAND_FAILED, str(exc)) from None
    domids = [g["domid"] for g in sup.status()["guests"] if g["pid"]]
    if not domids:
        return {}
    return _pending([(d, "policy-reload", {}) for d in domids], _worker_results("policy reload"))


LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def cmd_log_level(sup, args: dict):
    """Set the log level of the daemon and every worker: DEBUG, INFO, WARNING, ERROR."""
    level = _arg(args, "level", str).upper()
    if level not in LEVELS:
        raise CommandError(Errno.BAD_ARGUMENTS, f"level must be one of {', '.join(LEVELS)}")
    sup.set_log_level(level)
    domids = [g["domid"] for g in sup.status()["guests"] if g["pid"]]
    if not domids:
        return {"supervisor": level}
    return _pending([(d, "log-level", {"level": level}) for d in domids], _worker_results("log-level"))


def cmd_devices(sup, args: dict):
    """List assignable devices on this host and which guest holds each."""
    return sup.devices()


COMMANDS = {
    "status": (cmd_status, {}),
    "list": (cmd_list, {}),
    "devices": (cmd_devices, {}),
    "restart": (cmd_restart, {"domid": int}),
    "permissive": (cmd_permissive, {"mode": str, "bdf": str}),
    "policy-reload": (cmd_policy_reload, {}),
    "log-level": (cmd_log_level, {"level": str}),
}
