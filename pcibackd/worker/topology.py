"""Where exported host functions appear in the guest.

Pure: addresses in, addresses out.

Two modes, chosen like the kernel's ``passthrough=`` parameter:

* ``vpci`` (default): one virtual root ``0000:00``; each host slot gets the
  first free virtual slot (or the one asked for with ``vdevfn-N``), and the
  functions of one multi-function device keep their function numbers inside
  that slot.
* ``passthrough``: devices appear at their real address; one root per
  (domain, bus) that carries an exported device.
"""

from __future__ import annotations

from pcibackd.wire.bdf import BDF


class TopologyError(ValueError):
    """The device cannot be placed (virtual bus full, slot taken, ...)."""


def place(mode: str, hosts: list[BDF], existing: dict[BDF, BDF] | None = None,
          wanted_slot: dict[BDF, int] | None = None) -> dict[BDF, BDF]:
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
    slot_of_host: dict[tuple[int, int, int], int] = {
        (h.domain, h.bus, h.dev): g.dev for h, g in result.items()}
    used = set(slot_of_host.values())
    for h in hosts:
        if h in result:
            continue
        key = (h.domain, h.bus, h.dev)
        slot = slot_of_host.get(key)
        if slot is None:
            slot = wanted_slot.get(h)
            if slot is not None and slot in used:
                raise TopologyError(f"virtual slot {slot:#x} requested for {h} is taken")
            if slot is None:
                free = [s for s in range(32) if s not in used]
                if not free:
                    raise TopologyError("virtual PCI bus is full (32 slots)")
                slot = free[0]
            slot_of_host[key] = slot
            used.add(slot)
        result[h] = BDF(0, 0, slot, h.fn)
    return result


def roots(mode: str, placement: dict[BDF, BDF]) -> list[str]:
    """The ``root-K`` values (``dddd:bb``) to publish, sorted and deduplicated."""
    if mode == "vpci":
        return ["0000:00"]      # the virtual root is published even when empty
    return sorted({f"{g.domain:04x}:{g.bus:02x}" for g in placement.values()})
