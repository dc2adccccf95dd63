"""What the broker is given: the privileged effects and the journal, as protocols.

Production implements :class:`Physdev` with libxenctrl/libxencall and the
supervisor's dom0 sysfs config access; the simulated dom0 with a model of Xen
(``simdom0.physdev``).  :mod:`pcibackd.irq.journal` implements :class:`JournalStore`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from pcibackd.irq.function import Kind
from pcibackd.irq.messages import Mapping
from pcibackd.wire.bdf import BDF


class PhysdevError(OSError):
    """A hypercall failed; ``errno`` is Xen's."""


class Physdev(Protocol):
    """The privileged effects (libxenctrl/libxencall and dom0 sysfs config in production)."""

    def prepare_msix(self, bdf: BDF) -> None: ...
    def release_msix(self, bdf: BDF) -> None: ...
    def map_pirq(self, domid: int, kind: Kind, bdf: BDF, entry: int, table_base: int) -> int: ...
    def unmap_pirq(self, domid: int, pirq: int) -> None: ...
    def restore_msi(self, bdf: BDF) -> None: ...
    def read_config(self, bdf: BDF, offset: int, size: int) -> int: ...
    def write_config(self, bdf: BDF, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class Recorded:
    """What a journal held at start."""

    mappings: dict[int, tuple[Mapping, ...]] = field(default_factory=dict)
    prepared: frozenset[BDF] = frozenset()
    damaged_domains: frozenset[int] = frozenset()   # journals that did not validate (kept aside)
    prepared_damaged: bool = False
    problems: tuple[str, ...] = ()


@dataclass
class ReplayReport:
    """What the broker's replay made of the journal at start."""

    adopted: list[Mapping] = field(default_factory=list)      # guest alive: kept as they are
    torn_down: list[Mapping] = field(default_factory=list)    # guest gone: unmapped, controls off
    uncertain: list[BDF] = field(default_factory=list)        # interrupted map: maps refused
    orphans: list[Mapping] = field(default_factory=list)      # PIRQs still failing to unmap
    damaged_domains: list[int] = field(default_factory=list)  # live guest, unreadable journal
    problems: list[str] = field(default_factory=list)


class JournalStore(Protocol):
    def save(self, domid: int, mappings: Sequence[Mapping]) -> None: ...
    def save_prepared(self, prepared: Iterable[BDF]) -> None: ...
    def forget(self, domid: int) -> None: ...
    def load(self) -> Recorded: ...
