"""Guest placement in vpci and passthrough topologies."""

import pytest

from pcibackd.worker import topology
from pcibackd.wire.bdf import BDF


def b(s):
    return BDF.parse(s)


def test_vpci_first_free_slot_and_functions_share_slot():
    p = topology.place("vpci", [b("0000:03:00.0"), b("0000:05:1f.0"), b("0000:03:00.1")])
    assert p[b("0000:03:00.0")] == b("0000:00:00.0")
    assert p[b("0000:05:1f.0")] == b("0000:00:01.0")
    assert p[b("0000:03:00.1")] == b("0000:00:00.1")
    assert topology.roots("vpci", p) == ["0000:00"]


def test_vpci_keeps_existing_and_honours_vdevfn():
    existing = {b("0000:03:00.0"): b("0000:00:00.0")}
    p = topology.place("vpci", [b("0000:04:00.0")], existing, {b("0000:04:00.0"): 5})
    assert p[b("0000:03:00.0")] == b("0000:00:00.0") and p[b("0000:04:00.0")] == b("0000:00:05.0")
    with pytest.raises(topology.TopologyError):
        topology.place("vpci", [b("0000:06:00.0")], p, {b("0000:06:00.0"): 5})


def test_vpci_bus_full():
    hosts = [BDF(0, 1, s, 0) for s in range(32)]
    p = topology.place("vpci", hosts)
    assert sorted(g.dev for g in p.values()) == list(range(32))
    with pytest.raises(topology.TopologyError):
        topology.place("vpci", [b("0000:02:00.0")], p)


def test_passthrough_real_addresses_and_roots():
    p = topology.place("passthrough", [b("0000:03:00.0"), b("0001:05:02.1"), b("0000:03:01.0")])
    assert all(h == g for h, g in p.items())
    assert topology.roots("passthrough", p) == ["0000:03", "0001:05"]


def test_unknown_mode():
    with pytest.raises(topology.TopologyError):
        topology.place("bogus", [b("0000:03:00.0")])
