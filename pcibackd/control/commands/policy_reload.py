"""Re-read the config-space policy file (permissive, hidden capabilities, quirks).

The file (policy_path in pcibackd.toml) is checked in the daemon first: a
malformed file changes nothing and the command fails (exit 1) saying why.
Then every running worker applies it to its devices (the daemon sends the
text: a worker, under a uid of its own, may not be able to open the file);
their emulated state is kept.  Workers started later read the file themselves.

  {"command": "policy-reload", "args": {}}
"""

from __future__ import annotations

from pcibackd.confspace import PolicyError, read_policy_text
from pcibackd.control.commands.base import CommandError, fan_out, running_guests
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import Errno

NAME = "policy-reload"
WORDS = ("policy", "reload")
ARGS = ()


def execute(face: DaemonFace, args: dict):
    path = face.policy_path
    try:
        text = read_policy_text(path)
    except PolicyError as exc:
        raise CommandError(Errno.COMMAND_FAILED, f"policy not reloaded: {exc}") from None
    domids = [g.domid for g in running_guests(face)]
    shape = lambda rs: {"policy": path, "workers": rs}    # noqa: E731
    args = {} if text is None else {"text": text}
    return fan_out(domids, "policy-reload", args, "policy reload", shape) if domids else shape([])


def render(result: dict) -> str:
    return (f"policy {result['policy'] or '(built-in defaults)'} reloaded by "
            f"{len(result['workers'])} worker(s)")
