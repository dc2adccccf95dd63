"""Logging setup (loguru): one call per process, after any fork.

Lines carry the guest's domid and the worker pid so ``journalctl | grep`` can
follow one guest; colour only on a terminal (the journal adds timestamps).
"""

from __future__ import annotations

import os
import sys

from loguru import logger

_FORMAT = ("{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} [{extra[who]}] {message}")


def setup(level: str = "INFO", domid: int | None = None, role: str | None = None) -> None:
    """Replace loguru's default sink with ours (stderr, no enqueue thread)."""
    who = role or ("supervisor" if domid is None else f"dom{domid} pid {os.getpid()}")
    logger.remove()
    logger.configure(extra={"who": who})
    logger.add(sys.stderr, level=level.upper(), format=_FORMAT,
               colorize=sys.stderr.isatty(), backtrace=False, diagnose=False, enqueue=False)
