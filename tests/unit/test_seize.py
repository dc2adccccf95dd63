"""Seize/release against a fake sysfs tree (never the host's)."""

import json
import os

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.confspace import ConfSpace
from pcibackd.hostpci.seize import SeizeError, current_driver, quiesce, release, seize
from simdom0.hostpci import SimHost

B = BDF.parse("0000:00:05.0")


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "root"
    dev = root / "sys/bus/pci/devices" / str(B)
    drv = root / "sys/bus/pci/drivers/e1000e"
    drv.mkdir(parents=True)
    dev.mkdir(parents=True)
    (dev / "driver_override").write_text("(null)\n")
    (drv / "unbind").write_text("")
    os.symlink(drv, dev / "driver")
    (root / "sys/bus/pci/drivers_probe").write_text("")
    (dev / "enable").write_text("0\n")
    config = bytearray(256)
    config[0:4] = bytes.fromhex("8680d310")
    config[0x04:0x06] = (0x0507).to_bytes(2, "little")   # the dom0 driver left DMA on
    (dev / "config").write_bytes(bytes(config))
    return root


def _command(root) -> int:
    return int.from_bytes((root / "sys/bus/pci/devices" / str(B) / "config").read_bytes()[4:6], "little")


def test_seize_records_unbinds_and_overrides(fake, tmp_path):
    rec = seize(B, tmp_path / "state", root=fake)
    dev = fake / "sys/bus/pci/devices" / str(B)
    assert rec["driver"] == "e1000e" and current_driver(B, fake) == "e1000e"   # the fake kernel does not rebind
    assert (dev / "driver_override").read_text() == "pci-stub\n"
    assert (fake / "sys/bus/pci/drivers/e1000e/unbind").read_text() == str(B)
    assert (fake / "sys/bus/pci/drivers_probe").read_text() == str(B)
    assert json.loads((tmp_path / "state/seized" / str(B)).read_text())["driver"] == "e1000e"
    assert (dev / "enable").read_text() == "1"                                   # IRQ routed, like pciback
    assert seize(B, tmp_path / "state", root=fake) == rec                        # idempotent


def test_release_restores(fake, tmp_path):
    seize(B, tmp_path / "state", root=fake)
    (fake / "sys/bus/pci/drivers_probe").write_text("")
    rec = release(B, tmp_path / "state", root=fake)
    dev = fake / "sys/bus/pci/devices" / str(B)
    assert rec["override"] == "(null)" and (dev / "driver_override").read_text() == "(null)\n"
    assert (dev / "enable").read_text() == "0"
    assert (fake / "sys/bus/pci/drivers_probe").read_text() == str(B)
    assert not (tmp_path / "state/seized" / str(B)).exists()
    assert release(B, tmp_path / "state", root=fake) is None


def test_seize_missing_device(fake, tmp_path):
    with pytest.raises(SeizeError):
        seize(BDF.parse("0000:09:00.0"), tmp_path / "state", root=fake)


def test_seize_turns_bus_master_off(fake, tmp_path):
    """xen-pciback disables the function at seize (pci_disable_device): no DMA until the
    guest's driver enables it; decoding and the rest of COMMAND stay."""
    seize(B, tmp_path / "state", root=fake)
    assert _command(fake) == 0x0503


def test_seize_of_a_stub_bound_function_turns_bus_master_off(fake, tmp_path):
    drv = fake / "sys/bus/pci/drivers/pci-stub"
    drv.mkdir(parents=True)
    dev = fake / "sys/bus/pci/devices" / str(B)
    (dev / "driver").unlink()
    os.symlink(drv, dev / "driver")
    seize(B, tmp_path / "state", root=fake)
    assert _command(fake) == 0x0503


def test_seize_of_a_bridge_clears_only_mwi(fake, tmp_path):
    cfg = fake / "sys/bus/pci/devices" / str(B) / "config"
    data = bytearray(cfg.read_bytes())
    data[0x0E] = 0x01
    data[0x04:0x06] = (0x0017).to_bytes(2, "little")
    cfg.write_bytes(bytes(data))
    seize(B, tmp_path / "state", root=fake)
    assert _command(fake) == 0x0007


def test_release_does_not_turn_bus_master_back_on(fake, tmp_path):
    seize(B, tmp_path / "state", root=fake)
    release(B, tmp_path / "state", root=fake)
    assert not _command(fake) & 0x0004


def test_guest_sees_bus_master_off_until_its_driver_enables_it(tmp_path):
    """After seize the guest's COMMAND shows BusMaster- (as through the kernel backend);
    the guest driver's pci_set_master reaches the device."""
    host = SimHost(tmp_path / "sim")
    dev = host.add("e1000e", B)
    dev.write(0x04, 2, 0x0007)                          # dom0's driver had DMA on
    assert quiesce(B, root=host.root) is True
    assert dev.read(0x04, 2) & 0x0007 == 0x0003
    cs = ConfSpace.build(dev)
    assert not cs.read(0x04, 2)[1] & 0x0004
    assert cs.write(0x04, 2, 0x0006) == 0
    assert dev.read(0x04, 2) & 0x0004
    assert quiesce(B, root=host.root) is True and quiesce(B, root=host.root) is False
