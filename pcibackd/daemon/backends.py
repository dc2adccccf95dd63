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
            if untrusted_domid not in warned:       # once per name, not per event
                warned.add(untrusted_domid)
                logger.warning("ignoring {}/{!r}: not a domid", BACKEND_ROOT, untrusted_domid[:20])
            continue
        domid = int(untrusted_domid)
        if domid == 0 or domid >= DOMID_FIRST_RESERVED:
            continue
        path = backend_path(domid)
        if xs.read(f"{path}/frontend") is not None:
            present[domid] = path
    return present


def remove_if_domain_gone(xs: XenStore, domid: int) -> bool:
    """Remove the backend nodes of a domain that no longer exists (xl destroy
    of a guest whose devices our toolstack attached: libxl does not know them)."""
    if xs.exists(f"/local/domain/{domid}"):
        return False
    xs.rm(backend_domain_path(domid))
    # The error node (if any) stays: it tells the administrator what happened.
    logger.info("domain {} is gone: its PCI backend nodes were removed", domid)
    return True
