"""Human-readable renderings of control results, by command name (pcibackctl, the demo)."""

from __future__ import annotations

from .commands import COMMANDS

RENDERERS = {name: cmd.render for name, cmd in COMMANDS.items()}
render_status = COMMANDS["status"].render


def render(command: str, result) -> str:
    return RENDERERS[command](result)
