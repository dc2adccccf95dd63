"""The platform interface: grants, event channels, the shared page, and the interrupt hypercalls.

Worker code only sees these protocols.  ``pcibackd.platform.xen`` implements
them with libxengnttab/libxenevtchn (``/dev/xen``) and sysfs; the simulated
dom0 beside the tests (``simdom0.platform``) with shared-memory files, datagram
sockets and device models.  :mod:`pcibackd.platform.select` picks one by name.

Event channels follow ``/dev/xen/evtchn``: a handle is one pollable fd; a port
that fires is reported once by :meth:`EventChannel.pending` and stays masked
until :meth:`EventChannel.unmask`; events that arrive meanwhile are latched and
reported after the unmask (so a guest flooding events costs O(1), XSA-332).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pcibackd.hostpci.port import HostPort
from pcibackd.wire.bdf import BDF


@runtime_checkable
class SharedPage(Protocol):
    """One mapped 4 KiB page shared with another domain."""

    buf: memoryview       # writable, PAGE_SIZE bytes

    def test_bit(self, offset: int, bit: int) -> bool: ...
    def set_bit(self, offset: int, bit: int) -> bool: ...    # atomic; returns old bit
    def clear_bit(self, offset: int, bit: int) -> bool: ...  # atomic; returns old bit
    def close(self) -> None: ...


@runtime_checkable
class EventChannel(Protocol):
    """An open event-channel handle (like one open of /dev/xen/evtchn)."""

    def fileno(self) -> int: ...
    def alloc_unbound(self, remote_domid: int) -> int: ...
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int: ...
    def notify(self, port: int) -> None: ...
    def pending(self) -> int | None: ...      # non-blocking; None when nothing fired
    def unmask(self, port: int) -> None: ...
    def unbind(self, port: int) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Platform(Protocol):
    """What a domain can do: ``domid`` is the domain this process acts as."""

    name: str
    domid: int

    def open_handles(self) -> None: ...    # now, what map_grant needs (a worker about to lose the right)
    def map_grant(self, remote_domid: int, gref: int) -> SharedPage: ...
    def open_evtchn(self) -> EventChannel: ...
    def open_device(self, bdf: BDF) -> HostPort: ...    # FileNotFoundError: no such function
    def assignable(self) -> list[BDF]: ...
    def physdev(self) -> object: ...
    # physdev(): the privileged interrupt effects, an ``irq.ports.Physdev`` (the supervisor's only;
    # a worker never calls it).  Every failure is an OSError carrying Xen's errno.


@runtime_checkable
class GrantingPlatform(Platform, Protocol):
    """A platform that can also act as the guest side (tests and benchmarks)."""

    def grant_page(self, remote_domid: int) -> tuple[int, SharedPage]: ...
    def end_grant(self, gref: int) -> None: ...


class PlatformError(OSError):
    """A grant or event-channel operation failed (carries an errno)."""
