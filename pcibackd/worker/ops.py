"""The request-page op dispatcher: an op's bytes in, a reply out.

I/O-injected: this module does no I/O of its own, but :meth:`Dispatcher.dispatch`
runs the guest-visible device (a ConfSpace) synchronously, and that reaches the
hardware through the HostPort it was built on.

XSA-155: the loop copies ``xen_pci_op`` out of the shared page ONCE
(:func:`snapshot_op`) and everything here works on that private copy; the
reply carries only what the backend may write back (``err``, ``value`` and the
used ``msix_entries[].vector``).

Handlers are a table keyed by ``XEN_PCI_OP_*``:

=================  ============================================================
op                 handler
=================  ============================================================
conf_read (0)      device lookup, then ``ConfSpace.read`` (access checks there)
conf_write (1)     device lookup, then ``ConfSpace.write``
enable_msi (2)     :attr:`Dispatcher.external`: ``worker/msi.py`` through the
disable_msi (3)    supervisor's interrupt broker (``worker/interrupts.py``);
enable_msix (4)    ``not_implemented`` when no broker is wired in
disable_msix (5)
enable_multi_msi   likewise; msi.py answers ``not_implemented``, like Linux
(10)
other              ``not_implemented`` (incl. AER ops 6..9, which only travel
                   backend->frontend)
=================  ============================================================
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pcibackd.wire import pciif
from pcibackd.wire.pciif import Err, Op, OpHeader


class DeviceView(Protocol):
    """What the dispatcher needs of a guest-visible device (a ConfSpace)."""

    def read(self, untrusted_offset: int, untrusted_size: int) -> tuple[int, int]: ...
    def write(self, untrusted_offset: int, untrusted_size: int, untrusted_value: int) -> int: ...


@dataclass(slots=True)
class Reply:
    """What goes back into the page: err, value, and MSI-X vectors [0:nr)."""

    err: int
    value: int = 0
    vectors: tuple[int, ...] = ()


@dataclass
class OpStats:
    """Counters a worker reports to the supervisor."""

    served: Counter = field(default_factory=Counter)   # by op name
    errors: Counter = field(default_factory=Counter)   # by Err name

    def count(self, untrusted_cmd: int, err: int) -> None:
        self.served[_OP_NAMES.get(untrusted_cmd, "unknown")] += 1
        if err:
            self.errors[_ERR_NAMES.get(err, str(err))] += 1


_OP_NAMES = {int(o): o.name for o in Op}
_ERR_NAMES = {int(e): e.name for e in Err}

Handler = Callable[["Dispatcher", OpHeader], Reply]


def snapshot_op(page_buf) -> bytes:
    """Copy xen_pci_op out of the shared page, once (XSA-155)."""
    return bytes(page_buf[pciif.SH_OP:pciif.SH_OP + pciif.PCI_OP.size])


class Dispatcher:
    """Serves ops for one guest against its guest-visible device map.

    ``devices`` maps the guest's (domain, bus, devfn) to a DeviceView; it is
    replaced wholesale on hot-plug, so a lookup never sees a half-built map.
    """

    def __init__(self, devices: dict[tuple[int, int, int], DeviceView] | None = None):
        self.devices: dict[tuple[int, int, int], DeviceView] = devices or {}
        self.stats = OpStats()
        # Ops served by a driver outside this core, from the whole snapshot (the MSI ops).
        self.external: dict[int, Callable[[bytes], Reply]] = {}

    def dispatch(self, op: bytes) -> Reply:
        """Serve one op from its private snapshot."""
        untrusted = OpHeader.unpack(op)
        external = self.external.get(untrusted.cmd)
        if external is not None:
            reply = external(op)
        else:
            reply = HANDLERS.get(untrusted.cmd, _not_implemented)(self, untrusted)
        self.stats.count(untrusted.cmd, reply.err)
        return reply


def _device(d: Dispatcher, untrusted: OpHeader) -> DeviceView | None:
    # Exact-key lookup: out-of-range values (devfn > 0xff ...) cannot alias.
    return d.devices.get((untrusted.domain, untrusted.bus, untrusted.devfn))


def _conf_read(d: Dispatcher, untrusted: OpHeader) -> Reply:
    dev = _device(d, untrusted)
    if dev is None:
        return Reply(Err.dev_not_found, 0)
    err, value = dev.read(untrusted.offset, untrusted.size)
    return Reply(err, value)


def _conf_write(d: Dispatcher, untrusted: OpHeader) -> Reply:
    dev = _device(d, untrusted)
    if dev is None:
        return Reply(Err.dev_not_found, 0)
    # Linux leaves value untouched on a write; we echo the guest's own value.
    return Reply(dev.write(untrusted.offset, untrusted.size, untrusted.value), untrusted.value)


def _not_implemented(d: Dispatcher, untrusted: OpHeader) -> Reply:
    return Reply(Err.not_implemented, 0)


HANDLERS: dict[int, Handler] = {
    Op.conf_read: _conf_read,
    Op.conf_write: _conf_write,
}


def write_reply(page_buf, reply: Reply) -> None:
    """Write back only err, value and the used MSI-X vectors (never the rest)."""
    pciif.I32.pack_into(page_buf, pciif.SH_OP_ERR, reply.err)
    pciif.U32.pack_into(page_buf, pciif.SH_OP_VALUE, reply.value & 0xFFFFFFFF)
    for i, vector in enumerate(reply.vectors):
        pciif.U16.pack_into(page_buf, pciif.msix_vector_offset(i), vector)
