"""End to end: SR-IOV VFs in the vpci topology and bridges in passthrough, as Linux places
them, from the simulated sysfs (physfn links, functions nested under their bridges) through
the daemon to the xenstore nodes and the guest's scan."""

from __future__ import annotations

from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import backend_path

PF, VF1, VF2, VF_F0, VF_F1 = (BDF.parse(s) for s in (
    "0000:05:00.0", "0000:05:00.1", "0000:05:00.2", "0000:05:01.0", "0000:05:01.1"))
EDU = BDF.parse("0000:00:05.0")
PORT, BRIDGE, LEAF = (BDF.parse(s) for s in ("0000:00:03.0", "0000:01:00.0", "0000:04:01.0"))


def _published(dom0, domid: int) -> tuple[dict[int, str], list[str]]:
    be = backend_path(domid)
    n = int(dom0.xs.read(f"{be}/num_devs"))
    roots = [dom0.xs.read(f"{be}/root-{k}") for k in range(int(dom0.xs.read(f"{be}/root_num")))]
    return {i: dom0.xs.read(f"{be}/vdev-{i}") for i in range(n)}, roots


def test_vfs_on_the_virtual_bus(dom0):
    dom0.host.add("edu", EDU)
    dom0.host.add("nvme-sriov", PF)
    for vf in (VF1, VF2, VF_F0, VF_F1):
        dom0.host.add("nvme-vf", vf, physfn=PF)
    dom0.create_guest(1, [EDU, VF2, VF_F0, VF1, VF_F1])
    devices = dom0.frontend(1).connect()
    vdevs, roots = _published(dom0, 1)
    # VFs keep their function number and share their host slot's virtual slot, except
    # that a VF at function 0 keeps one to itself (05:01.1 does not join 05:01.0)
    assert vdevs == {0: "0000:00:00.00", 1: "0000:00:01.02", 2: "0000:00:02.00",
                     3: "0000:00:01.01", 4: "0000:00:03.01"}
    assert roots == ["0000:00"]
    found = {str(d.bdf): (d.vendor, d.device) for d in devices}
    # the guest finds every VF (a PV guest scans all functions) under the kernel's identity
    nvme = (0x1B36, 0x0010)
    assert found == {"0000:00:00.0": (0x1234, 0x11E8), "0000:00:01.1": nvme,
                     "0000:00:01.2": nvme, "0000:00:02.0": nvme, "0000:00:03.1": nvme}


def test_passthrough_publishes_only_the_top_root(dom0_passthrough):
    dom0 = dom0_passthrough
    dom0.host.add("pcie-root-port", PORT)
    dom0.host.add("pci-bridge", BRIDGE, bridge=PORT)
    dom0.host.add("rtl8139", LEAF, bridge=BRIDGE)
    dom0.create_guest(2, [BRIDGE, LEAF])
    devices = dom0.frontend(2).connect()
    assert _published(dom0, 2)[1] == ["0000:01"]          # not the bridge's secondary bus
    assert BRIDGE in [d.bdf for d in devices]


def test_passthrough_device_without_its_bridge_gets_its_own_root(dom0_passthrough):
    dom0 = dom0_passthrough
    dom0.host.add("pcie-root-port", PORT)
    dom0.host.add("pci-bridge", BRIDGE, bridge=PORT)
    dom0.host.add("rtl8139", LEAF, bridge=BRIDGE)
    dom0.create_guest(3, [LEAF])
    devices = dom0.frontend(3).connect()
    assert _published(dom0, 3)[1] == ["0000:04"]
    assert [d.bdf for d in devices] == [LEAF]
