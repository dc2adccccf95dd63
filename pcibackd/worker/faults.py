"""Fault injection, for the crash-isolation tests and benches only.

Driver: reads the environment and keeps its marker files on disk.

Set ``PCIBACKD_FAILPOINTS`` in the daemon's environment to a comma-separated
list of ``name@domid`` (workers inherit it):

    boot-crash@N   worker N raises while booting (a crash loop)
    boot-slow@N    worker N takes BOOT_SLOW seconds to boot, longer than the
                   default heartbeat_timeout (a loaded dom0, a slow device reset)
    op-crash@N     worker N raises inside the handler of a conf_read at offset
                   0xFC, once (a marker file keeps the successor healthy)
    op-crash-loop@N  like op-crash, every time: each successor crashes on the
                   op left pending (a guest whose own op crashes its worker: FATAL)
    op-hang@N      worker N hangs inside that handler, once (no more ops, no
                   reports): its own op watchdog must end it (worker/stuck.py)
    msi-crash@N    worker N raises after an enable_msi(x) was served (the broker
                   mapped) and before the reply is written, once

Unset (production), nothing here touches the op path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from pcibackd.wire.pciif import Op, OpHeader

TRIGGER_OFFSET = 0xFC
MSI_ENABLES = (Op.enable_msi, Op.enable_msix)
BOOT_SLOW = 3.0
ENV = "PCIBACKD_FAILPOINTS"


def active(domid: int) -> set[str]:
    """The failpoints armed for worker ``domid``."""
    spec = os.environ.get(ENV, "")
    return {name for item in spec.split(",") if "@" in item
            for name, _, d in [item.partition("@")] if d.strip() == str(domid)}


class InjectedFault(RuntimeError):
    """Raised by a failpoint."""


def wrap_dispatch(dispatch: Callable, points: set[str], marker_dir: Path, domid: int) -> Callable:
    """``dispatch`` with the op failpoints in ``points`` armed (once each)."""
    def faulty(op: bytes):
        untrusted = OpHeader.unpack(op)
        if untrusted.cmd == Op.conf_read and untrusted.offset == TRIGGER_OFFSET:
            if "op-crash-loop" in points:
                raise InjectedFault("injected handler exception (every time)")
            for name in ("op-crash", "op-hang"):
                marker = marker_dir / f"failpoint-{name}-dom{domid}"
                if name in points and not marker.exists():
                    marker.touch()
                    if name == "op-crash":
                        raise InjectedFault("injected handler exception")
                    while True:
                        time.sleep(3600)
        reply = dispatch(op)
        marker = marker_dir / f"failpoint-msi-crash-dom{domid}"
        if "msi-crash" in points and untrusted.cmd in MSI_ENABLES and not marker.exists():
            marker.touch()
            raise InjectedFault("injected crash after an MSI enable was mapped")
        return reply
    return faulty
