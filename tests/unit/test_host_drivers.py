"""The real driver port against a fake sysfs/proc tree (never the host's), and the pool's file."""

from __future__ import annotations

import json
import os

import pytest

from pcibackd.daemon.pool import Member, Pool
from pcibackd.hostpci.drivers import (DriverError, SysfsDrivers, default_route6_interfaces, default_route_interfaces,
                                      mounted_sources)
from pcibackd.wire.bdf import BDF

NIC, DISK = BDF.parse("0000:02:00.0"), BDF.parse("0000:03:00.0")


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    for bdf, drv in ((NIC, "e1000e"), (DISK, "nvme")):
        real = root / "sys/devices/pci0000:00" / str(bdf)
        real.mkdir(parents=True)
        (real / "config").write_bytes(bytes(64))
        (real / "driver_override").write_text("(null)\n")
        d = root / "sys/bus/pci/drivers" / drv
        d.mkdir(parents=True)
        (d / "unbind").write_text("")
        os.symlink(d, real / "driver")
        (root / "sys/bus/pci/devices").mkdir(parents=True, exist_ok=True)
        os.symlink(real, root / "sys/bus/pci/devices" / str(bdf))
    (root / "sys/bus/pci/drivers_probe").write_text("")
    # eth0 under the NIC, nvme0n1 (partition nvme0n1p2) under the disk controller
    (root / "sys/devices/pci0000:00" / str(NIC) / "net/eth0").mkdir(parents=True)
    (root / "sys/class/net").mkdir(parents=True)
    os.symlink(root / "sys/devices/pci0000:00" / str(NIC) / "net/eth0", root / "sys/class/net/eth0")
    blk = root / "sys/devices/pci0000:00" / str(DISK) / "nvme/nvme0/nvme0n1"
    (blk / "nvme0n1p2").mkdir(parents=True)
    (root / "sys/class/block").mkdir(parents=True)
    os.symlink(blk, root / "sys/class/block/nvme0n1")
    os.symlink(blk / "nvme0n1p2", root / "sys/class/block/nvme0n1p2")
    (root / "proc/net").mkdir(parents=True)
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/net/route").write_text("Iface\tDestination\tGateway\n")
    (root / "proc/self/mounts").write_text("proc /proc proc rw 0 0\n")
    return root


def test_in_use_probe(root, tmp_path):
    d = SysfsDrivers(tmp_path / "state", root)
    assert d.in_use(NIC) is None and d.in_use(DISK) is None
    (root / "proc/net/route").write_text("Iface\tDestination\tGateway\neth0\t00000000\t0102A8C0\n")
    assert "eth0 carries the default route" in d.in_use(NIC)
    (root / "sys/class/net/br0/brif/eth0").mkdir(parents=True)           # the route through a bridge
    (root / "proc/net/route").write_text("Iface\tDestination\tGateway\nbr0\t00000000\t0102A8C0\n")
    assert "eth0 carries the default route (through br0)" in d.in_use(NIC)
    (root / "proc/self/mounts").write_text("/dev/nvme0n1p2 / ext4 rw 0 0\n")
    assert "nvme0n1" in d.in_use(DISK)


def test_parsers_of_proc():
    assert default_route_interfaces("Iface\tDestination\neth1\t0000FEA9\nbr0\t00000000\n") == {"br0"}
    v6 = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 "
          "00000400 00000001 00000000 00000003 eth1\n"
          "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 "
          "ffffffff 00000001 00000000 00200200 lo\n")
    assert default_route6_interfaces(v6) == {"eth1"}
    assert mounted_sources("/dev/sda1 / ext4 rw 0 0\nnone /x tmpfs\n",
                           "Filename Type\n/dev/sdb2 partition 0 0\n") == {"sda1", "sdb2"}


def test_a_stub_that_does_not_bind_is_undone(root, tmp_path):
    """The fake kernel never binds pci-stub (as with the module missing): the function is given back."""
    d = SysfsDrivers(tmp_path / "state", root)
    with pytest.raises(DriverError, match="did not bind"):
        d.bind_stub(NIC)
    dev = root / "sys/bus/pci/devices" / str(NIC)
    assert (dev / "driver_override").read_text() == "(null)\n"
    assert not (tmp_path / "state/seized" / str(NIC)).exists()
    with pytest.raises(DriverError, match="no PCI function"):
        d.bind_stub(BDF.parse("0000:09:00.0"))


def test_pool_persists_and_skips_bad_entries(tmp_path):
    p = Pool(tmp_path)
    p.add(Member(NIC, "e1000e", "lan", "hide"))
    p.add(Member(DISK, None))
    again = Pool(tmp_path)
    assert again.get(NIC) == Member(NIC, "e1000e", "lan", "hide") and again.by_name("lan").bdf == NIC
    data = json.loads((tmp_path / "pool.json").read_text())
    data["functions"].append({"bdf": "not-a-bdf"})
    (tmp_path / "pool.json").write_text(json.dumps(data))
    assert [m.bdf for m in Pool(tmp_path).sorted()] == [NIC, DISK]
    again.remove(NIC)
    assert [m.bdf for m in Pool(tmp_path).sorted()] == [DISK]
    (tmp_path / "pool.json").write_text("{not json")
    assert Pool(tmp_path).sorted() == []
