"""Seize/release against a fake sysfs tree (never the host's)."""

import json
import os

import pytest

from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.seize import SeizeError, current_driver, release, seize

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
    return root


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
