"""PCI addresses: parsing (strict, for untrusted xenstore text) and formatting."""

from __future__ import annotations

import re
from dataclasses import dataclass

_BDF_RE = re.compile(r"^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")
_SHORT_RE = re.compile(r"^([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


@dataclass(frozen=True, order=True)
class BDF:
    """Domain (segment), bus, device (slot) and function of a PCI function."""

    domain: int
    bus: int
    dev: int
    fn: int

    def __post_init__(self) -> None:
        if not (0 <= self.domain <= 0xFFFF and 0 <= self.bus <= 0xFF
                and 0 <= self.dev <= 0x1F and 0 <= self.fn <= 7):
            raise ValueError(f"PCI address out of range: {self.domain}:{self.bus}:{self.dev}.{self.fn}")

    @property
    def devfn(self) -> int:
        return (self.dev << 3) | self.fn

    @classmethod
    def from_devfn(cls, domain: int, bus: int, devfn: int) -> "BDF":
        return cls(domain, bus, devfn >> 3, devfn & 7)

    @classmethod
    def parse(cls, untrusted_text: str) -> "BDF":
        """Parse ``dddd:bb:dd.f`` (or ``bb:dd.f``); ValueError on anything else."""
        m = _BDF_RE.match(untrusted_text.strip())
        if m:
            return cls(*(int(g, 16) for g in m.groups()))
        m = _SHORT_RE.match(untrusted_text.strip())
        if m:
            return cls(0, *(int(g, 16) for g in m.groups()))
        raise ValueError(f"not a PCI address: {untrusted_text[:40]!r}")

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.dev:02x}.{self.fn:x}"

    @property
    def sysfs_name(self) -> str:
        return str(self)

    @property
    def vdev_text(self) -> str:
        """The ``vdev-N`` form: function printed with two digits (the PV protocol uses %02x)."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.dev:02x}.{self.fn:02x}"
