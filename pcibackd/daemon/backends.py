"""The PCI backend directories in xenstore, as the supervisor reads and tidies them.

Directory names under :data:`BACKEND_ROOT` come from whoever may write there
(a toolstack, or a rogue one): anything that is not a guest domid is ignored,
with one warning per name.
"""

from __future__ import annotations

from loguru import logger

from pcibackd.wire.paths import BACKEND_ROOT, backend_domain_path, backend_path
from pcibackd.xenstore.client import XenStore

DOMID_FIRST_RESERVED = 0x7FF0


def list_backends(xs: XenStore, warned: set[str]) -> dict[int, str]:
    """``{domid: backend path}`` of each backend whose frontend is set.
    ``warned`` remembers the names already warned about."""
    present = {}
    for untrusted_domid in xs.ls(BACKEND_ROOT):
        if not untrusted_domid.isdigit() or len(untrusted_domid) > 5:
            _warn_once(untrusted_domid, warned)
            continue
        domid = int(untrusted_domid)
        if domid == 0 or domid >= DOMID_FIRST_RESERVED:
            continue
        path = backend_path(domid)
        if xs.read(f"{path}/frontend") is not None:
            present[domid] = path
    return present


def _warn_once(untrusted_name: str, warned: set[str]) -> None:
    if untrusted_name not in warned and len(warned) < 1024:      # once per name, not per event
        warned.add(untrusted_name)
        logger.warning("ignoring {}/{!r}: not a domid", BACKEND_ROOT, untrusted_name[:20])


def remove_if_domain_gone(xs: XenStore, domid: int) -> bool:
    """Remove the backend nodes of a domain that no longer exists (xl destroy
    of a guest whose devices our toolstack attached: libxl does not know them)."""
    if xs.exists(f"/local/domain/{domid}"):
        return False
    xs.rm(backend_domain_path(domid))
    # The error node (if any) stays: it tells the administrator what happened.
    logger.info("domain {} is gone: its PCI backend nodes were removed", domid)
    return True


# Event paths below BACKEND_ROOT/<domid>/<dev>/ whose change can matter to the
# supervisor (the rest, e.g. a worker's own state or root nodes, do not).
_RELEVANT_LEAVES = ("frontend", "state", "num_devs")


def touched_domids(untrusted_paths: list[str], warned: set[str]) -> set[int] | None:
    """The domids whose backends a batch of watch events may have changed, or
    None when the whole directory must be read again (an event on the root).
    ``warned`` remembers the names that are not domids, warned about once."""
    found = touched_nodes(untrusted_paths, warned)
    return None if found is None else found[0]


def touched_nodes(untrusted_paths: list[str], warned: set[str]) -> tuple[set[int], set[int]] | None:
    """(domids whose backends may have changed, those of them whose device list
    may have: what the interrupt broker follows), or None as in :func:`touched_domids`."""
    out: set[int] = set()
    devs: set[int] = set()
    prefix = BACKEND_ROOT + "/"
    for untrusted in untrusted_paths:
        if untrusted == BACKEND_ROOT:
            return None
        if not untrusted.startswith(prefix):
            continue
        parts = untrusted[len(prefix):].split("/")
        if not parts[0].isdigit() or len(parts[0]) > 5:
            _warn_once(parts[0], warned)
            continue
        leaf = parts[-1]
        listing = len(parts) <= 2 or leaf == "num_devs" or leaf.startswith(("dev-", "state-"))
        if listing or leaf in _RELEVANT_LEAVES:
            out.add(int(parts[0]))
        if listing:
            devs.add(int(parts[0]))
    return out, devs


def presence_touched(untrusted_paths: list[str]) -> set[int]:
    """The domids whose backend may have gained or lost its ``frontend`` node in a batch
    of events (an event on the directories themselves, or on that node); events on
    other nodes (state, devices) leave a present backend present, with no read."""
    out: set[int] = set()
    prefix = BACKEND_ROOT + "/"
    for untrusted in untrusted_paths:
        if not untrusted.startswith(prefix):
            continue
        parts = untrusted[len(prefix):].split("/")
        if parts[0].isdigit() and len(parts[0]) <= 5 and (len(parts) <= 2 or parts[-1] == "frontend"):
            out.add(int(parts[0]))
    return out


class CachedReads:
    """A read-only view of xenstore for the interrupt broker's scan: a domain's
    nodes are read again only after :meth:`forget` (an event touched them), so
    following N backends costs reads for the changed ones, not for all N."""

    def __init__(self, xs: XenStore):
        self.xs = xs
        self.cache: dict[int, dict[str, str | None]] = {}

    def forget(self, domid: int) -> None:
        self.cache.pop(domid, None)

    def forget_nodes(self, untrusted_paths: list[str]) -> None:
        """Forget the nodes a batch of events names (a directory's event: its whole domain)."""
        prefix = BACKEND_ROOT + "/"
        for untrusted in untrusted_paths:
            if not untrusted.startswith(prefix):
                continue
            parts = untrusted[len(prefix):].split("/")
            if not parts[0].isdigit() or len(parts[0]) > 5:
                continue
            if len(parts) <= 2:
                self.cache.pop(int(parts[0]), None)
            else:
                self.cache.get(int(parts[0]), {}).pop(untrusted, None)

    def read(self, path: str) -> str | None:
        prefix = BACKEND_ROOT + "/"
        domid = int(path[len(prefix):].split("/", 1)[0]) if path.startswith(prefix) else -1
        nodes = self.cache.setdefault(domid, {})
        if path not in nodes or domid < 0:
            nodes[path] = self.xs.read(path)
        return nodes[path]


def backend_of(xs: XenStore, domid: int) -> str | None:
    """The backend path of ``domid`` if its frontend is set (one read)."""
    path = backend_path(domid)
    return path if xs.read(f"{path}/frontend") is not None else None
