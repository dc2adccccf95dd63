"""What the supervisor shows of released functions: the reset record and the quarantine.

The workers write the records when a function leaves its guest
(:mod:`pcibackd.hostpci.release`); the supervisor writes one when it takes a
function from dom0 (:func:`reset_at_seize`), reads them, and clears a
quarantine when pcibackctl asks with ``--force``.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from pcibackd.hostpci.release import ReleaseRecord, seize_function
from pcibackd.hostpci.records import clear_quarantine, read_records, write_record
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


def reset_at_seize(platform, state_dir: Path, bdf: BDF) -> ReleaseRecord:
    """Reset ``bdf`` as it joins the assignable pool (:func:`seize_function`) and record it in
    ``state_dir`` beside the releases' records (a failed reset quarantines it)."""
    try:
        port = platform.open_device(bdf)
    except OSError as exc:
        record = ReleaseRecord(str(bdf), "?", False, f"cannot open it: {exc.strerror or exc}", event="seize")
    else:
        try:
            record = seize_function(bdf, port)
        finally:
            getattr(port, "close", lambda: None)()
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    write_record(Path(state_dir), record)
    if record.reset_ok:
        logger.info("seized {}: {}", bdf, record.describe())
        if clear_quarantine(Path(state_dir), bdf):
            logger.warning("{}: quarantine of an earlier failed reset cleared: it reset fine as it "
                           "joined the pool again", bdf)
    else:
        logger.error("seized {}: {}; quarantined: no guest gets it until cleared with --force",
                     bdf, record.describe())
    return record
