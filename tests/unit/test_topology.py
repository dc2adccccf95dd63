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


# -- SR-IOV virtual functions and bridges (Linux vpci.c / passthrough.c rules) ----------

VF = topology.HostFacts(is_virtfn=True)
PF_SLOT = [b("0000:01:00.0"), b("0000:01:00.1"), b("0000:01:00.2")]     # PF, VF offset 1 stride 1
FACTS = {PF_SLOT[1]: VF, PF_SLOT[2]: VF, b("0000:01:01.0"): VF, b("0000:01:01.1"): VF}


def test_vf_alone_at_function_0_gets_a_slot_of_its_own():
    p = topology.place("vpci", [b("0000:03:00.0"), b("0000:01:01.0"), b("0000:03:00.1")],
                       facts=FACTS)
    assert p[b("0000:01:01.0")] == b("0000:00:01.0")
    assert p[b("0000:03:00.1")] == b("0000:00:00.1")


def test_vf_at_function_0_is_never_joined_by_another_function_of_its_host_slot():
    p = topology.place("vpci", [b("0000:01:01.0"), b("0000:01:01.1")], facts=FACTS)
    assert p[b("0000:01:01.0")] == b("0000:00:00.0")
    assert p[b("0000:01:01.1")] == b("0000:00:01.1")           # keeps its function number
    # ... also when it comes later (hot-plug keeps existing placements)
    q = topology.place("vpci", [b("0000:01:01.1")], {b("0000:01:01.0"): b("0000:00:00.0")},
                       facts=FACTS)
    assert q[b("0000:01:01.1")] == b("0000:00:01.1")


def test_vf_alone_at_a_nonzero_function_keeps_its_function_number():
    """Linux keeps the host function number (a Xen PV guest scans every function of a slot)."""
    p = topology.place("vpci", [PF_SLOT[2]], facts=FACTS)
    assert p[PF_SLOT[2]] == b("0000:00:00.2")


def test_several_vfs_of_one_pf_share_a_slot_like_their_host_slot():
    p = topology.place("vpci", [PF_SLOT[1], PF_SLOT[2]], facts=FACTS)
    assert (p[PF_SLOT[1]], p[PF_SLOT[2]]) == (b("0000:00:00.1"), b("0000:00:00.2"))


def test_a_pf_with_its_vfs_stays_together():
    p = topology.place("vpci", PF_SLOT + [b("0000:01:01.0")], facts=FACTS)
    assert [p[h] for h in PF_SLOT] == [b("0000:00:00.0"), b("0000:00:00.1"), b("0000:00:00.2")]
    assert p[b("0000:01:01.0")] == b("0000:00:01.0")


def test_real_multifunction_devices_stay_together_whatever_the_order():
    hosts = [b("0000:03:00.2"), b("0000:04:00.0"), b("0000:03:00.0")]
    p = topology.place("vpci", hosts)
    assert p[b("0000:03:00.2")].dev == p[b("0000:03:00.0")].dev != p[b("0000:04:00.0")].dev


def test_vfs_in_passthrough_keep_their_address():
    p = topology.place("passthrough", PF_SLOT[1:] + [b("0000:01:01.0")], facts=FACTS)
    assert all(h == g for h, g in p.items())
    assert topology.roots("passthrough", p, FACTS) == ["0000:01"]


BRIDGE, BEHIND = b("0000:00:03.0"), b("0000:01:00.0")
DEEP = b("0000:02:05.0")
UP = {BEHIND: topology.HostFacts(upstream=(BRIDGE,)),
      DEEP: topology.HostFacts(upstream=(BRIDGE, b("0000:01:00.0")))}


def test_passthrough_publishes_only_the_top_root_of_a_bridge_and_a_device_behind_it():
    p = topology.place("passthrough", [BRIDGE, BEHIND])
    assert topology.roots("passthrough", p, UP) == ["0000:00"]
    assert topology.roots("passthrough", p) == ["0000:00", "0000:01"]   # without facts: both


def test_passthrough_device_behind_an_unexported_bridge_gets_its_own_root():
    p = topology.place("passthrough", [BEHIND, b("0000:00:1f.2")])
    assert topology.roots("passthrough", p, UP) == ["0000:00", "0000:01"]


def test_passthrough_any_exported_bridge_above_counts():
    p = topology.place("passthrough", [BRIDGE, DEEP])
    assert topology.roots("passthrough", p, UP) == ["0000:00"]
