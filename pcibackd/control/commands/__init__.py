"""The command registry: wire name -> :class:`Command`, one module per command.

To add a command: write ``<name>.py`` here (see ``base.py`` for what it holds)
and list it in ``_MODULES``.
"""

from __future__ import annotations

import importlib

from pcibackd.control.commands.base import Arg, Command, CommandError, Pending

_MODULES = ("status", "list", "devices", "restart", "permissive", "policy_reload", "log_level")

COMMANDS: dict[str, Command] = {
    c.name: c for c in (Command.from_module(importlib.import_module(f".{m}", __name__)) for m in _MODULES)}

__all__ = ["COMMANDS", "Arg", "Command", "CommandError", "Pending"]
