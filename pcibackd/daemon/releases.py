"""What the supervisor shows of released functions: the reset record and the quarantine.

The workers write the records when a function leaves its guest
(:mod:`pcibackd.hostpci.release`); the supervisor only reads them, and clears a
quarantine when pcibackctl asks with ``--force``.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from pcibackd.hostpci.release import ReleaseRecord, clear_quarantine, read_records
from pcibackd.wire.bdf import BDF


class ReleaseViews:
    """Mixed into the supervisor; ``runtime`` is its runtime directory (records in ``state/``)."""

    runtime: Path

    def releases(self) -> dict[BDF, tuple[ReleaseRecord, bool]]:
        """Each function's last release and whether it is quarantined."""
        return read_records(self.runtime / "state")

    def clear_quarantine(self, bdf: BDF) -> bool:
        """Let a quarantined function be handed to a guest again; False: it was not."""
        cleared = clear_quarantine(self.runtime / "state", bdf)
        if cleared:
            logger.warning("{}: quarantine cleared by pcibackctl --force", bdf)
        return cleared
