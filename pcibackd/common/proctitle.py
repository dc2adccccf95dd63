"""Process titles for ``ps`` and ``top``: ``pcibackd: worker dom3 (web1)``."""

from __future__ import annotations

import setproctitle

NAME_MAX = 32


def worker_title(domid: int, untrusted_name: str | None) -> str:
    """A worker's title; the guest's name only when it is short and printable."""
    name = untrusted_name if untrusted_name and len(untrusted_name) <= NAME_MAX \
        and untrusted_name.isprintable() else None
    return f"worker dom{domid}" + (f" ({name})" if name else "")


def set_title(what: str) -> None:
    """``pcibackd: <what>`` in ``ps``."""
    setproctitle.setproctitle(f"pcibackd: {what}")
