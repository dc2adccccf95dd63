"""Where exported host functions appear in the guest.

Pure: addresses and host facts in, addresses out.

Two modes, chosen like the kernel's ``passthrough=`` parameter, with Linux
xen-pciback's rules (vpci.c, passthrough.c):

* ``vpci`` (default): one virtual root ``0000:00``.  A function keeps its
  function number.  It joins the virtual slot already holding functions of
  the same host slot (a multi-function device stays together), else takes the
  first free virtual slot (or the one asked for with ``vdevfn-N``).  An
  SR-IOV virtual function at function 0 is no multi-function device: it gets a
  slot of its own and nothing joins it, so a guest never takes it for function
  0 of something else and skips the rest.
* ``passthrough``: devices appear at their real address.  A root is published
  for each exported function's bus unless a bridge above it is exported too
  (the guest reaches the function through that bridge's root).

Host facts (whether a function is a VF, which bridges are above it) come from
the caller as :class:`HostFacts`; a function without facts is a plain one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pcibackd.wire.bdf import BDF


class TopologyError(ValueError):
    """The device cannot be placed (virtual bus full, slot taken, ...)."""


@dataclass(frozen=True)
class HostFacts:
    """What placement needs to know about a host function besides its address."""

    is_virtfn: bool = False              # an SR-IOV virtual function (sysfs ``physfn``)
    upstream: tuple[BDF, ...] = ()       # bridges between the host root and the function


PLAIN = HostFacts()
Facts = Mapping[BDF, HostFacts]


def _alone(h: BDF, facts: Facts) -> bool:
    """A VF at function 0 keeps a virtual slot to itself."""
    return h.fn == 0 and facts.get(h, PLAIN).is_virtfn


def place(mode: str, hosts: list[BDF], existing: dict[BDF, BDF] | None = None,
          wanted_slot: dict[BDF, int] | None = None, facts: Facts | None = None) -> dict[BDF, BDF]:
    """Return host -> guest addresses for ``hosts``, keeping ``existing`` ones.

    ``existing`` is the current map (hot-plug adds to it, never moves a
    device); ``wanted_slot`` holds ``vdevfn-N`` requests (slot numbers).
    """
    result = dict(existing or {})
    if mode == "passthrough":
        for h in hosts:
            result.setdefault(h, h)
        return result
    if mode != "vpci":
        raise TopologyError(f"unknown topology mode {mode!r}")
    wanted_slot = wanted_slot or {}
    facts = facts or {}
    slot_of_host: dict[tuple[int, int, int], int] = {}
    for h, g in result.items():
        if not _alone(h, facts):
            slot_of_host.setdefault((h.domain, h.bus, h.dev), g.dev)
    used = {g.dev for g in result.values()}
    for h in hosts:
        if h in result:
            continue
        key = (h.domain, h.bus, h.dev)
        alone = _alone(h, facts)
        slot = None if alone else slot_of_host.get(key)
        if slot is None:
            slot = wanted_slot.get(h)
            if slot is not None and slot in used:
                raise TopologyError(f"virtual slot {slot:#x} requested for {h} is taken")
            if slot is None:
                free = [s for s in range(32) if s not in used]
                if not free:
                    raise TopologyError("virtual PCI bus is full (32 slots)")
                slot = free[0]
            if not alone:
                slot_of_host[key] = slot
            used.add(slot)
        result[h] = BDF(0, 0, slot, h.fn)
    return result


def roots(mode: str, placement: dict[BDF, BDF], facts: Facts | None = None) -> list[str]:
    """The ``root-K`` values (``dddd:bb``) to publish, sorted and deduplicated."""
    if mode == "vpci":
        return ["0000:00"]      # the virtual root is published even when empty
    facts = facts or {}
    exported = set(placement)
    return sorted({f"{g.domain:04x}:{g.bus:02x}" for h, g in placement.items()
                   if not exported.intersection(facts.get(h, PLAIN).upstream)})
