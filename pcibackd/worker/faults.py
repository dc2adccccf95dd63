"""Fault injection, for the crash-isolation tests and benches only.

Set ``PCIBACKD_FAILPOINTS`` in the daemon's environment to a comma-separated
list of ``name@domid`` (workers inherit it):

    boot-crash@N   worker N raises while booting (a crash loop)
    boot-slow@N    worker N takes BOOT_SLOW seconds to boot, longer than the
                   default heartbeat_timeout (a loaded dom0, a slow device reset)
    op-crash@N     worker N raises inside the handler of a conf_read at offset
                   0xFC, once (a marker file keeps the successor healthy)
    op-hang@N      worker N hangs inside that handler, once (no more ops, no
                   heartbeats): the supervisor must kill and replace it

Unset (production), nothing here touches the op path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pcibackd.wire.pciif import OP_HEADER, Op

TRIGGER_OFFSET = 0xFC
BOOT_SLOW = 3.0


def active(domid: int) -> set[str]:
    spec = os.environ.get("PCIBACKD_FAILPOINTS", "")
    return {name for item in spec.split(",") if "@" in item
            for name, _, d in [item.partition("@")] if d.strip() == str(domid)}


class InjectedFault(RuntimeError):
    """Raised by a failpoint."""


def wrap_dispatch(dispatch, points: set[str], marker_dir: Path, domid: int):
    """``dispatch`` with the op failpoints in ``points`` armed (once each)."""
    def faulty(op: bytes):
        cmd, offset = OP_HEADER.unpack_from(op)[0], OP_HEADER.unpack_from(op)[5]
        if cmd == Op.conf_read and offset == TRIGGER_OFFSET:
            for name in ("op-crash", "op-hang"):
                marker = marker_dir / f"failpoint-{name}-dom{domid}"
                if name in points and not marker.exists():
                    marker.touch()
                    if name == "op-crash":
                        raise InjectedFault("injected handler exception")
                    while True:
                        time.sleep(3600)
        return dispatch(op)
    return faulty
