"""The request-page op dispatcher: an op's bytes in, a reply out.

I/O-injected: apart from a rate-limited log line for errors this module does
no I/O of its own, but :meth:`Dispatcher.dispatch` runs the guest-visible
device (a ConfSpace) synchronously, and that reaches the hardware through the
HostPort it was built on.

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

Every answer is counted (:class:`OpStats`) as served, and a non-zero ``err``
as a *miss* or an *error* by :func:`classify`'s table :data:`MISSES`
(op, err, offset): a miss is an answer a healthy guest asks for on purpose,
an error is one an administrator should look at.

==========  ==============  ==========  =====================================
op          err             offset      why it is a miss
==========  ==============  ==========  =====================================
conf_read   dev_not_found   any         enumeration of an empty slot, or a read
                                        of a function on its way out (unplug)
conf_write  dev_not_found   any         a write to a function on its way out
conf_read   invalid_offset  0x100       extended config space probe of a
                                        conventional function (Linux
                                        pci_cfg_space_size, lspci)
==========  ==============  ==========  =====================================

Codes are named symbolically (:func:`code_name`): ``XEN_PCI_ERR_*``, or for
``enable_msix``, which answers with Linux errnos, ``-EINVAL`` and the like.
"""

from __future__ import annotations

import enum
import errno
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from loguru import logger

from pcibackd.common.ratelimit import worth_logging
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


class Outcome(enum.Enum):
    OK = "ok"
    MISS = "miss"        # asked for on purpose by a healthy guest (a probe)
    ERROR = "error"


EXT_CONFIG_PROBE = 0x100     # the first dword of extended config space

# (op, err) -> which offsets make that answer a miss (see the module docstring)
MISSES: dict[tuple[int, int], Callable[[int], bool]] = {
    (Op.conf_read, Err.dev_not_found): lambda offset: True,
    (Op.conf_write, Err.dev_not_found): lambda offset: True,
    (Op.conf_read, Err.invalid_offset): lambda offset: offset == EXT_CONFIG_PROBE,
}


def classify(cmd: int, err: int, offset: int) -> Outcome:
    """Whether an answer is a success, a probe miss or an error (table :data:`MISSES`)."""
    if err == 0:
        return Outcome.OK
    rule = MISSES.get((cmd, err))
    return Outcome.MISS if rule is not None and rule(offset) else Outcome.ERROR


_OP_NAMES = {int(o): o.name for o in Op}
_ERR_NAMES = {int(e): f"XEN_PCI_ERR_{e.name}" for e in Err}
_ERRNO_OPS = {int(Op.enable_msix)}       # answer failures with negative Linux errnos


def op_name(cmd: int) -> str:
    """``conf_read`` ...; a command no guest should send is ``unknown`` (bounded names)."""
    return _OP_NAMES.get(cmd, "unknown")


def code_name(cmd: int, err: int) -> str:
    """An answer's ``err`` by name: ``XEN_PCI_ERR_*``, ``-EINVAL`` for ``enable_msix``'s errnos."""
    if cmd in _ERRNO_OPS and err != Err.dev_not_found and -err in errno.errorcode:
        return f"-{errno.errorcode[-err]}"
    name = _ERR_NAMES.get(err)
    if name is not None:
        return name
    return f"-{errno.errorcode[-err]}" if -err in errno.errorcode else f"err_{err}"


# Op service time histogram bounds (microseconds; Prometheus 'le' buckets, +Inf implied).
SERVICE_BOUNDS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000, 1_000_000)


class ServiceHistogram:
    """Bucket counts of op service times since the worker started (``counts[-1]``: above
    the last bound); cheap enough for the op path (one bisect)."""

    def __init__(self, bounds_us: tuple[float, ...] = SERVICE_BOUNDS_US):
        self.bounds_us = tuple(bounds_us)
        self._bounds_ns = [b * 1000 for b in bounds_us]
        self.counts = [0] * (len(bounds_us) + 1)
        self.sum_ns = 0

    def add(self, ns: int) -> None:
        self.counts[bisect_left(self._bounds_ns, ns)] += 1
        self.sum_ns += ns


@dataclass
class OpStats:
    """Counters a worker reports to the supervisor (since the worker started)."""

    served: Counter = field(default_factory=Counter)                  # by op name
    errors: dict[str, Counter] = field(default_factory=dict)          # op name -> code name -> n
    misses: dict[str, Counter] = field(default_factory=dict)          # op name -> code name -> n
    service: ServiceHistogram = field(default_factory=ServiceHistogram)

    def count(self, untrusted_cmd: int, err: int, untrusted_offset: int = 0) -> Outcome:
        name = op_name(untrusted_cmd)
        self.served[name] += 1
        if not err:
            return Outcome.OK
        outcome = classify(untrusted_cmd, err, untrusted_offset)
        where = self.misses if outcome is Outcome.MISS else self.errors
        where.setdefault(name, Counter())[code_name(untrusted_cmd, err)] += 1
        return outcome

    @property
    def error_count(self) -> int:
        return sum(sum(c.values()) for c in self.errors.values())


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
        if self.stats.count(untrusted.cmd, reply.err, untrusted.offset) is Outcome.ERROR:
            self._log_error(untrusted, reply.err)
        return reply

    def _log_error(self, untrusted: OpHeader, err: int) -> None:
        n = self.stats.error_count
        if worth_logging(n):          # a guest can repeat errors at will: log2 of them
            logger.warning("{} {:04x}:{:02x}:{:02x}.{} offset {:#x} size {}: {} ({} error(s) so far)",
                           op_name(untrusted.cmd), untrusted.domain & 0xFFFF, untrusted.bus & 0xFF,
                           untrusted.devfn >> 3 & 0x1F, untrusted.devfn & 7, untrusted.offset & 0xFFFFFFFF,
                           untrusted.size, code_name(untrusted.cmd, err), n)


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
