"""Small builders the unit and end-to-end tests share."""

from __future__ import annotations

import threading

from pcibackd.wire import pciif
from pcibackd.wire.bdf import BDF
from pcibackd.xenstore.client import XenStore
from pcibackd.xenstore.toolstack import Toolstack


def op_bytes(cmd: int, devfn: int = 0, value: int = 0, entries=()) -> bytes:
    """A private copy of an op as the worker takes it from the shared page (entry numbers in ``entries``)."""
    buf = bytearray(pciif.PCI_OP.size)
    pciif.OP_HEADER.pack_into(buf, 0, cmd, 0, 0, 0, devfn, 0, 0, value, 0)
    for i, e in enumerate(entries):
        pciif.MSIX_ENTRY.pack_into(buf, pciif.OP_MSIX_ENTRIES + 4 * i, 0, e)
    return bytes(buf)


def detach_in_background(xenstored_socket: str, domid: int, bdf: str) -> tuple[threading.Thread, threading.Event]:
    """Start the toolstack's hot-unplug of ``bdf`` from ``domid`` on its own connection; the event is set when
    the detach returned (or failed)."""
    done = threading.Event()

    def unplug():
        xs = XenStore(xenstored_socket)
        try:
            Toolstack(xs).detach(domid, BDF.parse(bdf))
        finally:
            xs.close()
            done.set()
    t = threading.Thread(target=unplug)
    t.start()
    return t, done
