"""Set the log level of the daemon and of every worker.

LEVEL: TRACE DEBUG INFO SUCCESS WARNING ERROR CRITICAL (any case).  Workers
started later inherit it.  It lasts until the daemon restarts.

  {"command": "log-level", "args": {"level": "DEBUG"}}
"""

from __future__ import annotations

from pcibackd.control.commands.base import Arg, CommandError, fan_out, running_guests
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno

NAME = "log-level"
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
ARGS = (Arg("level", str, "one of " + " ".join(LEVELS), metavar="LEVEL"),)


def execute(face: DaemonFace, args: dict):
    level = args["level"].upper()
    if level not in LEVELS:
        raise CommandError(Errno.BAD_ARGUMENTS, f"level must be one of {', '.join(LEVELS)}")
    face.set_log_level(level)
    domids = [g.domid for g in running_guests(face)]
    shape = lambda rs: {"level": level, "workers": rs}    # noqa: E731
    return fan_out(domids, "log-level", {"level": level}, "log-level", shape) if domids else shape([])


def render(result: dict) -> str:
    return f"log level {result['level']} (daemon and {len(result['workers'])} worker(s))"
