"""The host-device port: the only way pcibackd touches a physical function.

``pcibackd.hostpci.sysfs`` reads real devices through
``/sys/bus/pci/devices/BDF/config`` (read-only in tests); ``simdom0.hostpci``
models a device built from a real dump with spec-based writable bits and keeps a
write log.  confspace and the ops code use only this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciregs import CAPABILITY_LIST, HEADER_END, STATUS, STATUS_CAP_LIST

Read = Callable[[int, int], int]          # (offset, size) -> value of a function's config space
CAP_TTL = 48                              # bounds a looped list, as Linux's PCI_FIND_CAP_TTL does


def find_capability(read: Read, cap_id: int) -> int | None:
    """Offset of the first legacy capability ``cap_id``, or None (loop-safe; a
    function reading all-ones has none)."""
    if not read(STATUS, 2) & STATUS_CAP_LIST:
        return None
    pos = read(CAPABILITY_LIST, 1)
    for _ in range(CAP_TTL):
        pos &= 0xFC
        if pos < HEADER_END:
            return None
        header = read(pos, 2)
        if header & 0xFF == 0xFF:
            return None
        if header & 0xFF == cap_id:
            return pos
        pos = header >> 8
    return None


@dataclass(frozen=True)
class Resource:
    """One line of sysfs ``resource``: start, end (inclusive), flags (IORESOURCE_*)."""

    start: int
    end: int
    flags: int

    IORESOURCE_IO = 0x100
    IORESOURCE_MEM = 0x200
    IORESOURCE_PREFETCH = 0x2000
    IORESOURCE_MEM_64 = 0x100000
    IORESOURCE_UNSET = 0x20000000      # no address assigned (or the claim failed)
    IORESOURCE_DISABLED = 0x10000000   # not decoded
    IORESOURCE_BUSY = 0x80000000       # the kernel's own "in use" mark
    # bus-specific bits of a PCI resource
    IORESOURCE_ROM_ENABLE = 0x1        # ROM: enable bit as read from the device
    IORESOURCE_ROM_SHADOW = 0x2        # ROM: the image is the shadow copy at 0xC0000 (VGA)
    IORESOURCE_PCI_FIXED = 0x10        # fixed by the kernel (legacy IDE ranges, VGA shadow)

    @property
    def size(self) -> int:
        return 0 if self.end <= self.start and self.start == 0 else self.end - self.start + 1


@dataclass(frozen=True)
class DeviceInfo:
    """What is known about a host function besides its config space."""

    bdf: BDF
    vendor: int
    device: int
    class_code: int          # 24-bit class/subclass/prog-if
    subsystem_vendor: int
    subsystem_device: int
    revision: int
    irq: int                 # dom0 IRQ (what pcifront will bind as the PIRQ)
    config_size: int         # 256 or 4096
    resources: tuple[Resource, ...] = field(default=())  # BAR0..5, ROM (index 6), ...
    physfn: BDF | None = None    # an SR-IOV VF's physical function (sysfs ``physfn``)
    upstream: tuple[BDF, ...] = field(default=())  # bridges above it, the root's first

    @property
    def is_virtfn(self) -> bool:
        """An SR-IOV virtual function: its vendor/device registers read 0xffff by design,
        the kernel's identity (``vendor``/``device``) is the one to trust."""
        return self.physfn is not None


@runtime_checkable
class HostPort(Protocol):
    """Config-space access to one host function (naturally aligned 1/2/4 bytes)."""

    info: DeviceInfo

    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...
