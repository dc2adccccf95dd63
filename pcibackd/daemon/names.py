"""Domain names for people: ``/local/domain/<domid>/name``, as the toolstack wrote it.

Shown next to domids (status, metrics labels); never used to decide anything.

:class:`NameWatch` follows renames (``xl rename`` rewrites that node) with one
xenstore watch per guest: nothing runs until a name changes, and then one
read.  (A worker's process title keeps the name it started with.)
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from loguru import logger

from pcibackd.xenstore.client import XenStore

MAX_NAME = 64
TOKEN = "names"          # the watch token of name nodes
_UNSHOWN = re.compile(r"[^\x21-\x7e]")      # a name is printed in tables and log lines: no spaces or controls
_NAME_PATH = re.compile(r"/local/domain/([0-9]{1,5})/name")


def name_path(domid: int) -> str:
    return f"/local/domain/{int(domid)}/name"


def domain_name(xs: XenStore, domid: int) -> str:
    """The domain's name, made printable ("" when it has none or it cannot be read)."""
    try:
        untrusted = xs.read(name_path(domid))
    except (OSError, ValueError):
        return ""
    return clean_name(untrusted)


def clean_name(untrusted: str | None) -> str:
    """At most :data:`MAX_NAME` printable ASCII characters; anything else becomes '?'."""
    if not isinstance(untrusted, str):
        return ""
    return _UNSHOWN.sub("?", untrusted[:MAX_NAME])


class NameWatch:
    """Guests' names, kept current (see the module docstring)."""

    def __init__(self, xs: XenStore):
        self.xs = xs
        self._registered: set[int] = set()     # watches whose registration event is still to come

    def follow(self, domid: int) -> str:
        """Watch the domain's name from now on; its name now."""
        try:
            self.xs.watch(name_path(domid), TOKEN)
            self._registered.add(domid)
        except (OSError, ValueError) as exc:
            logger.debug("domain {}: its name is not followed: {}", domid, exc)
        return domain_name(self.xs, domid)

    def forget(self, domid: int) -> None:
        self._registered.discard(domid)
        try:
            self.xs.unwatch(name_path(domid), TOKEN)
        except (OSError, ValueError):
            pass

    def renamed(self, events: Iterable[tuple[str, str]], guests: Mapping[int, object]) -> None:
        """Read again the names watch ``events`` touched (each guest has a ``name``)."""
        for untrusted_path, token in events:
            m = _NAME_PATH.fullmatch(untrusted_path) if token == TOKEN else None
            domid = int(m.group(1)) if m else -1
            if domid in self._registered:      # the event of the watch's registration: read just after it
                self._registered.discard(domid)
                continue
            guest = guests.get(domid)
            if guest is not None:
                name = domain_name(self.xs, domid)
                if name != guest.name:
                    logger.info("domain {} is now called {!r} (was {!r})", domid, name, guest.name)
                    guest.name = name
