"""Bounded logging for things a guest or a rogue peer can repeat at will (XSA-130)."""

from __future__ import annotations


def worth_logging(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th ... occurrence: log volume grows as log2(count)."""
    return count > 0 and count & (count - 1) == 0
