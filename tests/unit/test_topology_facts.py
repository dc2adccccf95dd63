"""Host facts (SR-IOV VF, bridges above) from the simulated sysfs into placement and roots,
through the device set and the xenbus machine, in both topologies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.worker import topology
from pcibackd.worker import xenbus as xb
from pcibackd.worker.devices import DeviceSet
from pcibackd.worker.ops import Dispatcher
from pcibackd.worker.xenbus_nodes import parse_backend
from simdom0.hostpci import SimHost
from simdom0.platform import SimPlatform

PORT, BRIDGE, LEAF = BDF(0, 0, 3, 0), BDF(0, 1, 0, 0), BDF(0, 2, 1, 0)
PF, VF1, VF2 = BDF(0, 5, 0, 0), BDF(0, 5, 0, 1), BDF(0, 5, 0, 2)
NIC = BDF(0, 0, 6, 0)


@pytest.fixture
def simdir(tmp_path):
    host = SimHost(tmp_path / "simdir" / "pci")
    host.add("pcie-root-port", PORT)
    host.add("pci-bridge", BRIDGE, bridge=PORT)
    host.add("rtl8139", LEAF, bridge=BRIDGE)
    host.add("nvme-sriov", PF)
    host.add("nvme-vf", VF1, physfn=PF)
    host.add("nvme-vf", VF2, physfn=PF)
    host.add("rtl8139", NIC)
    return tmp_path / "simdir"


def _devices(simdir, tmp_path, mode="vpci") -> DeviceSet:
    cfg = SimpleNamespace(policy_path=None, domid=7, topology=mode)
    return DeviceSet(cfg, Dispatcher(), SimPlatform(simdir, 0), tmp_path / "run")


def test_device_set_reads_host_facts(simdir, tmp_path):
    devices = _devices(simdir, tmp_path)
    assert devices.host_facts(VF1) == topology.HostFacts(is_virtfn=True)
    assert devices.host_facts(PF) == topology.PLAIN
    assert devices.host_facts(LEAF) == topology.HostFacts(upstream=(PORT, BRIDGE))
    assert devices.host_facts(BDF(0, 9, 0, 0)) == topology.PLAIN          # no such function


def _nodes(*hosts):
    d = {"state": "1", "online": "1", "num_devs": str(len(hosts)),
         "frontend": "/local/domain/1/device/pci/0"}
    for i, h in enumerate(hosts):
        d[f"dev-{i}"], d[f"key-{i}"], d[f"state-{i}"] = str(h), str(h), "1"
    return parse_backend(d)


def _publish(machine: xb.BackendMachine, *hosts) -> xb.Publish:
    effects = machine.handle(xb.Probe(_nodes(*hosts), xb.FrontendNodes(True, "1", "", "", "")))
    [publish] = [e for e in effects if isinstance(e, xb.Publish)]
    return publish


def test_passthrough_publishes_the_top_root_only(simdir, tmp_path):
    devices = _devices(simdir, tmp_path, "passthrough")
    m = xb.BackendMachine(mode="passthrough", host_facts=devices.host_facts)
    assert _publish(m, BRIDGE, LEAF).roots == ("0000:01",)      # the bridge's own bus, not 02
    m = xb.BackendMachine(mode="passthrough", host_facts=devices.host_facts)
    assert _publish(m, PORT, BRIDGE, LEAF).roots == ("0000:00",)
    m = xb.BackendMachine(mode="passthrough", host_facts=devices.host_facts)
    assert _publish(m, LEAF, NIC).roots == ("0000:00", "0000:02")


def test_vpci_places_vfs_like_linux(simdir, tmp_path):
    devices = _devices(simdir, tmp_path)
    m = xb.BackendMachine(host_facts=devices.host_facts)
    vdevs = dict(_publish(m, NIC, VF2, PF, VF1).vdevs)
    assert vdevs == {0: "0000:00:00.00", 1: "0000:00:01.02", 2: "0000:00:01.00",
                     3: "0000:00:01.01"}
    m = xb.BackendMachine(host_facts=devices.host_facts)
    assert dict(_publish(m, VF2).vdevs) == {0: "0000:00:00.02"}


def test_vpci_refuses_a_bridge_with_one_plain_message(simdir, tmp_path):
    devices = _devices(simdir, tmp_path)
    with pytest.raises(OSError) as info:
        devices.export([(BRIDGE, BDF(0, 0, 0, 0))], {})
    assert str(info.value).endswith(f"{BRIDGE}: can't export bridges on the virtual PCI bus")
    assert str(info.value).count(str(BRIDGE)) == 1 and str(info.value).count("Errno") == 1
