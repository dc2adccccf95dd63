"""Domain names for people: ``/local/domain/<domid>/name``, as the toolstack wrote it.

Shown next to domids (status, metrics labels); never used to decide anything.
"""

from __future__ import annotations

import re

from pcibackd.xenstore.client import XenStore

MAX_NAME = 64
_UNSHOWN = re.compile(r"[^\x21-\x7e]")      # a name is printed in tables and log lines: no spaces or controls


def domain_name(xs: XenStore, domid: int) -> str:
    """The domain's name, made printable ("" when it has none or it cannot be read)."""
    try:
        untrusted = xs.read(f"/local/domain/{int(domid)}/name")
    except (OSError, ValueError):
        return ""
    return clean_name(untrusted)


def clean_name(untrusted: str | None) -> str:
    """At most :data:`MAX_NAME` printable ASCII characters; anything else becomes '?'."""
    if not isinstance(untrusted, str):
        return ""
    return _UNSHOWN.sub("?", untrusted[:MAX_NAME])
