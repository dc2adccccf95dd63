"""The command registry: wire name -> :class:`Command`, one module per command.

To add a command: write ``<name>.py`` here (see ``base.py`` for what it holds),
import it below and list it in ``_MODULES``.
"""

from __future__ import annotations

from pcibackd.control.commands import (devices, log_level, metrics, permissive, policy_reload, quarantine_clear,
                                       restart, status)
from pcibackd.control.commands import (assignable_add, assignable_list, assignable_remove, pci_attach,
                                       pci_detach, pci_list)
from pcibackd.control.commands import list as list_
from pcibackd.control.commands.base import Answer, Arg, Command, CommandError, Pending

_MODULES = (status, list_, devices, restart, permissive, policy_reload, log_level, quarantine_clear, metrics)
_LIFECYCLE = (assignable_add, assignable_remove, assignable_list, pci_attach, pci_detach, pci_list)

COMMANDS: dict[str, Command] = {c.name: c for c in map(Command.from_module, _MODULES + _LIFECYCLE)}

__all__ = ["COMMANDS", "Answer", "Arg", "Command", "CommandError", "Pending"]
