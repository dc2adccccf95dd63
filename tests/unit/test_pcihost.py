"""pcibackd.hostpci: dumps, the spec model, simulated devices, and read-only sysfs access."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcibackd.hostpci.port import HostPort
from pcibackd.hostpci.sysfs import SysfsDevice, list_host_devices
from pcibackd.wire.bdf import BDF
from simdom0.dumps import list_dumps, load_dump
from simdom0.hostpci import SimDevice, SimHost
from simdom0.platform import SimPlatform
from simdom0.dumps import DUMP_FILES
from simdom0.hwmodel import find_capabilities

ALL_DUMPS = sorted(list_dumps())
SPAWN = multiprocessing.get_context("spawn")
SIM_BDF = BDF(0, 0x42, 3, 0)


@pytest.fixture
def host(tmp_path: Path) -> SimHost:
    return SimHost(tmp_path / "sim")


def sim(host: SimHost, dump: str) -> SimDevice:
    return host.add(dump, SIM_BDF)


# --- dumps -------------------------------------------------------------------

def test_every_fixture_is_shipped():
    expected = {"e1000e", "edu", "ich9-ahci", "intel-hda", "mch", "megasas-gen2", "nvme", "nvme-sriov", "nvme-vf",
                "pci-bridge", "pci-testdev", "pcie-root-port", "qemu-xhci", "rtl8139", "virtio-net",
                "virtio-net-modern"} | {f"host-vm-00.0{i}.0" for i in range(6)}
    dumps = list_dumps()
    assert set(dumps) == expected
    for path in dumps.values():
        assert all((path / f).is_file() for f in DUMP_FILES)


def test_load_dump_fields():
    d = load_dump("nvme-sriov")
    assert d.bdf == BDF(0, 1, 0, 0)
    assert len(d.config) == 4096
    assert d.ids["vendor"] == 0x1B36 and d.ids["class"] == 0x010802
    assert d.irq == 10
    assert d.resources[0].start == 0xFE800000 and d.resources[0].size == 0x4000
    assert d.resources[7].size == 0x8000        # VF BAR0 for 2 VFs
    with pytest.raises(FileNotFoundError):
        load_dump("no-such-device")


@pytest.mark.parametrize("name", ALL_DUMPS)
def test_every_dump_reads_back(host, name):
    d = load_dump(name)
    dev = sim(host, name)
    size = len(d.config)
    assert dev.info.config_size == size
    assert dev.info.vendor == d.ids["vendor"] and dev.info.class_code == d.ids["class"]
    assert dev.info.irq == d.irq and dev.info.resources == d.resources
    got = b"".join(dev.read(off, 4).to_bytes(4, "little") for off in range(0, size, 4))
    assert got == d.config
    # The same files read through the sysfs reader (sim root looks like sysfs).
    with SysfsDevice(SIM_BDF, root=host.root) as sysfs:
        assert sysfs.info == dev.info
        assert all(sysfs.read(off, 2) == int.from_bytes(d.config[off:off + 2], "little")
                   for off in range(0, size, 2))


def test_capability_walk_legacy_and_extended():
    caps = find_capabilities(load_dump("nvme-sriov").config)
    assert [(c.kind, c.cap_id, c.offset) for c in caps] == [
        ("legacy", 0x11, 0x40), ("legacy", 0x10, 0x80), ("legacy", 0x01, 0x60),
        ("extended", 0x0E, 0x100), ("extended", 0x10, 0x120)]
    root_port = [(c.name, c.offset) for c in find_capabilities(load_dump("pcie-root-port").config)]
    assert ("aer", 0x100) in root_port and ("acs", 0x148) in root_port
    assert find_capabilities(load_dump("rtl8139").config) == []


# --- BAR sizing ----------------------------------------------------------------

BAR_SIZING = [
    # dump, offset, value written, read back
    ("e1000e", 0x10, 0xFFFFFFFF, 0xFFFE0000),            # 32-bit mem, 128K
    ("e1000e", 0x18, 0xFFFFFFFF, 0xFFFFFFE1),            # I/O, 32 bytes
    ("e1000e", 0x30, 0xFFFFF800, 0xFFFC0000),            # ROM 256K, enable bit left clear
    ("e1000e", 0x30, 0xFFFFFFFF, 0xFFFC0001),            # ROM enable bit is writable
    ("host-vm-00.03.0", 0x10, 0xFFFFFFFF, 0xFFF80004),   # 64-bit mem, 512K, low dword
    ("host-vm-00.03.0", 0x14, 0xFFFFFFFF, 0xFFFFFFFF),   # ... upper dword
    ("virtio-net", 0x20, 0xFFFFFFFF, 0xFFFFC00C),        # 64-bit prefetchable, 16K
    ("virtio-net", 0x24, 0xFFFFFFFF, 0xFFFFFFFF),
    ("megasas-gen2", 0x10, 0xFFFFFFFF, 0xFFFFFF01),      # I/O, 256 bytes
    ("megasas-gen2", 0x1C, 0xFFFFFFFF, 0xFFFC0004),      # 64-bit mem, 256K
    ("pci-testdev", 0x10, 0xFFFFFFFF, 0xFFFFF000),
    ("pci-testdev", 0x14, 0xFFFFFFFF, 0xFFFFFF01),
    ("rtl8139", 0x30, 0xFFFFFFFF, 0xFFFC0001),
    ("edu", 0x14, 0xFFFFFFFF, 0x00000000),               # unimplemented BAR
    ("pci-bridge", 0x10, 0xFFFFFFFF, 0xFFFFFF04),        # type-1 BAR0, 64-bit 256 bytes
    ("pcie-root-port", 0x38, 0xFFFFFFFF, 0x00000000),    # type-1 ROM not implemented
    ("nvme-sriov", 0x144, 0xFFFFFFFF, 0xFFFFC004),       # SR-IOV VF BAR0: 32K / 2 VFs
]


@pytest.mark.parametrize("name,offset,value,expected", BAR_SIZING)
def test_bar_sizing(host, name, offset, value, expected):
    dev = sim(host, name)
    original = dev.read(offset, 4)
    dev.write(offset, 4, value)
    assert dev.read(offset, 4) == expected
    dev.write(offset, 4, original)
    assert dev.read(offset, 4) == original


@pytest.mark.parametrize("name", ALL_DUMPS)
def test_bar_size_mask_matches_resource(host, name):
    d = load_dump(name)
    dev = sim(host, name)
    nbars = 6 if d.config[0x0E] & 0x7F == 0 else 2
    upper_half = set()
    for i in range(nbars):
        off = 0x10 + 4 * i
        if i in upper_half:
            continue
        dev.write(off, 4, 0xFFFFFFFF)
        probe = dev.read(off, 4)
        size = 0 if d.physfn else d.resources[i].size      # a VF's BARs are read-only zero
        if size == 0:
            assert probe == 0
            continue
        if probe & 1:                                   # I/O
            assert (~(probe & ~0x3) & 0xFFFFFFFF) + 1 == size
        elif probe & 0x6 == 0x4:                        # 64-bit memory
            dev.write(off + 4, 4, 0xFFFFFFFF)
            mask64 = (dev.read(off + 4, 4) << 32) | (probe & ~0xF)
            assert (~mask64 & (1 << 64) - 1) + 1 == size
            upper_half.add(i + 1)
        else:
            assert (~(probe & ~0xF) & 0xFFFFFFFF) + 1 == size


def test_byte_write_to_bar_keeps_type_bits(host):
    dev = sim(host, "host-vm-00.03.0")
    dev.write(0x10, 1, 0xFF)                            # type bits and bits below 512K are RO
    assert dev.read(0x10, 4) == 0x00100004


# --- read-only bits -------------------------------------------------------------

@pytest.mark.parametrize("name,offset,size", [
    ("e1000e", 0x00, 4),              # vendor/device
    ("e1000e", 0x08, 4),              # revision/class
    ("e1000e", 0x0E, 1),              # header type
    ("e1000e", 0x2C, 4),              # subsystem
    ("e1000e", 0x34, 1),              # capability pointer
    ("e1000e", 0x3D, 1),              # interrupt pin
    ("nvme", 0x44, 4),                # MSI-X table offset/BIR
    ("nvme", 0x84, 4),                # PCIe device capabilities
    ("host-vm-00.01.0", 0x40, 4),     # vendor-specific capability
    ("host-vm-00.01.0", 0x54, 4),
    ("e1000e", 0x144, 4),             # device serial number (extended)
    ("nvme-sriov", 0x12C, 4),         # SR-IOV InitialVFs/TotalVFs
])
def test_read_only_registers_stick(host, name, offset, size):
    dev = sim(host, name)
    before = dev.read(offset, size)
    for value in (0, (1 << 8 * size) - 1, before ^ ((1 << 8 * size) - 1)):
        dev.write(offset, size, value)
        assert dev.read(offset, size) == before


def test_command_register_writable_bits(host):
    dev = sim(host, "e1000e")
    dev.write(0x04, 2, 0xFFFF)
    assert dev.read(0x04, 2) == 0x07FF                  # reserved bits 15:11 read 0
    dev.write(0x04, 2, 0x0000)
    assert dev.read(0x04, 2) == 0x0000
    dev.write(0x04, 1, 0x06)
    assert dev.read(0x04, 2) == 0x0006


def test_status_read_only_bits_stick(host):
    dev = sim(host, "e1000e")
    assert dev.read(0x06, 2) == 0x0010
    dev.write(0x06, 2, 0x0000)
    dev.write(0x06, 2, 0x06EF)                          # every non-RW1C bit
    assert dev.read(0x06, 2) == 0x0010


def test_bist_start_only_when_capable(host, tmp_path):
    dev = sim(host, "edu")
    dev.write(0x0F, 1, 0xFF)
    assert dev.read(0x0F, 1) == 0x00
    custom = tmp_path / "edu-bist"
    shutil.copytree(list_dumps()["edu"], custom)
    cfg = bytearray((custom / "config.bin").read_bytes())
    cfg[0x0F] = 0x80
    (custom / "config.bin").write_bytes(bytes(cfg))
    capable = host.add(custom, BDF(0, 0x43, 0, 0))
    capable.write(0x0F, 1, 0xFF)
    assert capable.read(0x0F, 1) == 0xC0                # start set, completion code RO


# --- RW1C -------------------------------------------------------------------------

def test_status_rw1c(host):
    dev = sim(host, "e1000e")
    dev.poke(0x06, 2, 0x0010 | 0x8000 | 0x2000 | 0x0100)  # device latched three errors
    dev.write(0x06, 2, 0x0000)
    assert dev.read(0x06, 2) == 0xA110                  # writing 0 clears nothing
    dev.write(0x06, 2, 0x8000)
    assert dev.read(0x06, 2) == 0x2110
    # A read-modify-write of the command dword writes the set status bits back: they clear.
    dword = dev.read(0x04, 4)
    dev.write(0x04, 4, dword | 0x0400)
    assert dev.read(0x04, 4) == (0x0010 << 16) | (dword & 0xFFFF) | 0x0400


@pytest.mark.parametrize("name,offset,size,set_bits,clear,remaining", [
    ("pci-bridge", 0x1E, 2, 0xF900, 0x1000, 0xE900),          # secondary status
    ("pci-bridge", 0x3E, 2, 0x0400, 0x0400, 0x0000),          # bridge control discard status
    ("nvme", 0x8A, 2, 0x000F, 0x0005, 0x000A),                # PCIe device status
    ("pcie-root-port", 0x66, 2, 0xC000, 0x4000, 0x8000),      # link status (port)
    ("pcie-root-port", 0x6E, 2, 0x011F, 0x0108, 0x0017),      # slot status
    ("pcie-root-port", 0x74, 4, 0x0001_0000, 0x0001_0000, 0),  # root status PME
    ("e1000e", 0x104, 4, 0x0010_1000, 0x0000_1000, 0x0010_0000),  # AER uncorrectable status
])
def test_rw1c_registers(host, name, offset, size, set_bits, clear, remaining):
    dev = sim(host, name)
    base = dev.read(offset, size) & ~set_bits
    dev.poke(offset, size, base | set_bits)
    dev.write(offset, size, clear)                      # RW bits of the register written as 0
    assert dev.read(offset, size) & set_bits == remaining


# --- capabilities ---------------------------------------------------------------------

def test_pm_power_state_and_pme(host):
    dev = sim(host, "nvme")                             # PM at 0x60; D1/D2 not supported
    pmcsr = 0x64
    dev.write(pmcsr, 2, 0x0003)
    assert dev.read(pmcsr, 2) & 0x3 == 3                # D3hot
    dev.write(pmcsr, 2, 0x0001)
    assert dev.read(pmcsr, 2) & 0x3 == 3                # D1 unsupported: discarded
    dev.write(pmcsr, 2, 0x0000)
    assert dev.read(pmcsr, 2) & 0x3 == 0
    dev.write(pmcsr, 2, 0x0100)
    assert dev.read(pmcsr, 2) & 0x0100                  # PME_En
    dev.poke(pmcsr, 2, dev.read(pmcsr, 2) | 0x8000)
    dev.write(pmcsr, 2, 0x8100)
    assert dev.read(pmcsr, 2) & 0x8000 == 0             # PME_Status RW1C
    assert dev.read(pmcsr, 2) & 0x0008                  # No_Soft_Reset RO stays


def test_msi_registers(host):
    dev = sim(host, "edu")                              # MSI at 0x40, 64-bit, not maskable
    ctrl = dev.read(0x42, 2)
    dev.write(0x42, 2, 0xFFFF)
    assert dev.read(0x42, 2) == ctrl | 0x0071           # enable + MME; MMC/64-bit RO
    dev.write(0x44, 4, 0xFEE0_1003)
    assert dev.read(0x44, 4) == 0xFEE0_1000             # address bits 1:0 RO
    dev.write(0x48, 4, 0x1234_5678)
    assert dev.read(0x48, 4) == 0x1234_5678             # upper address
    dev.write(0x4C, 2, 0x4021)
    assert dev.read(0x4C, 2) == 0x4021                  # data
    bridge = host.add("pci-bridge", BDF(0, 0x44, 0, 0))  # MSI at 0x4c, 64-bit, maskable, 1 vector
    bridge.write(0x5C, 4, 0xFFFFFFFF)
    assert bridge.read(0x5C, 4) == 0x1                  # only the implemented vector's mask bit
    bridge.write(0x60, 4, 0xFFFFFFFF)
    assert bridge.read(0x60, 4) == 0                    # pending bits RO


def test_msix_control(host):
    dev = sim(host, "nvme")                             # MSI-X at 0x40, 65 vectors
    assert dev.read(0x42, 2) == 0x0040
    dev.write(0x42, 2, 0xFFFF)
    assert dev.read(0x42, 2) == 0xC040
    dev.write(0x42, 2, 0x0000)
    assert dev.read(0x42, 2) == 0x0040


def test_pcie_control_registers(host):
    ep = sim(host, "nvme-sriov")                        # endpoint, PCIe cap at 0x80
    ep.write(0x88, 2, 0xFFFF)
    assert ep.read(0x88, 2) == 0x7FFF                   # Initiate FLR reads 0
    ep.write(0x90, 2, 0xFFFF)
    assert ep.read(0x90, 2) == 0x03CB                   # endpoint link control
    ep.write(0xA8, 2, 0xFFFF)
    assert ep.read(0xA8, 2) == 0xF7FF                   # device control 2
    rciep = host.add("nvme", BDF(0, 0x45, 0, 0))        # RCiEP: no link registers
    before = rciep.read(0x90, 2)
    rciep.write(0x90, 2, 0xFFFF)
    assert rciep.read(0x90, 2) == before
    port = host.add("pcie-root-port", BDF(0, 0x46, 0, 0))  # PCIe cap at 0x54, slot implemented
    port.write(0x64, 2, 0xFFFF)
    assert port.read(0x64, 2) == 0x0FDB
    port.write(0x6C, 2, 0xFFFF)
    assert port.read(0x6C, 2) == 0x1FFF                 # slot control
    port.write(0x70, 2, 0xFFFF)
    assert port.read(0x70, 2) == 0x001F                 # root control


def test_bridge_windows_and_bus_numbers(host):
    dev = sim(host, "pci-bridge")
    dev.write(0x18, 4, 0x00_07_06_05)
    assert dev.read(0x18, 4) == 0x00_07_06_05           # primary/secondary/subordinate/latency
    dev.write(0x1C, 2, 0xFFFF)
    assert dev.read(0x1C, 2) == 0xF0F0                  # 16-bit I/O window: low nibbles RO 0
    dev.write(0x30, 4, 0xFFFFFFFF)
    assert dev.read(0x30, 4) == 0                       # no upper I/O for a 16-bit window
    dev.write(0x24, 4, 0xFFFFFFFF)
    assert dev.read(0x24, 4) == 0xFFF1FFF1              # 64-bit prefetchable window
    dev.write(0x28, 4, 0x1)
    assert dev.read(0x28, 4) == 0x1
    dev.write(0x3E, 2, 0xFFFF)
    assert dev.read(0x3E, 2) == 0x0BFF


def test_sriov_control(host):
    dev = sim(host, "nvme-sriov")
    dev.write(0x128, 2, 0xFFFF)
    assert dev.read(0x128, 2) == 0x001F
    dev.write(0x130, 2, 2)
    assert dev.read(0x130, 2) == 2


# --- write log, reset, host ----------------------------------------------------------

def test_write_log_records_every_write(host):
    dev = sim(host, "edu")
    assert dev.write_log() == []
    dev.write(0x3C, 1, 0x0B)
    dev.write(0x00, 2, 0xFFFF)                          # read-only: nothing changes, still logged
    dev.poke(0x06, 2, 0x8010)                           # hardware side: not logged
    log = dev.write_log()
    assert [(r.offset, r.size, r.value) for r in log] == [(0x3C, 1, 0x0B), (0x00, 2, 0xFFFF)]
    assert log[0].before == 0x0A and log[0].after == 0x0B and log[0].changed == 0x01
    assert log[0].register == "interrupt_line" and log[0].pid == os.getpid()
    assert log[1].changed == 0 and log[1].register == ""
    dev.clear_write_log()
    assert dev.write_log() == []
    dev.write(0x0C, 1, 0x10)
    assert [r.register for r in dev.write_log()] == ["cache_line_size"]


def test_function_reset_restores_power_on_config(host):
    dev = sim(host, "e1000e")
    original = dev.config_bytes()
    dev.write(0x10, 4, 0xFFFFFFFF)
    dev.write(0x04, 2, 0)
    assert dev.config_bytes() != original
    dev.function_reset()
    assert dev.config_bytes() == original


@pytest.mark.parametrize("dump,resets", [("e1000e", True), ("nvme", False)])
def test_d3hot_to_d0_resets_unless_no_soft_reset(host, dump, resets):
    dev = sim(host, dump)
    pm = next(c.offset for c in dev.model.capabilities if c.name == "pm")
    original = dev.config_bytes()
    dev.write(0x0C, 1, 0x10)
    dev.write(pm + 4, 2, 0x0103)                        # D3hot, PME enabled
    dev.write(pm + 4, 2, 0x0100)                        # back to D0
    assert dev.read(pm + 4, 2) & 0x0103 == 0x0100       # in D0, PME_En sticky
    assert (dev.read(0x0C, 1) == original[0x0C]) == resets


def test_the_kernels_reset_puts_back_the_header_it_saved_but_not_message_enables(host):
    """sysfs ``reset``: the kernel saves the header and PCIe control, resets, writes them back;
    what it does not save for a function no dom0 driver uses (MSI enable) is at power-on."""
    dev = sim(host, "e1000e")
    msi = next(c.offset for c in dev.model.capabilities if c.name == "msi")
    dev.write(msi + 2, 2, dev.read(msi + 2, 2) | 1)
    dev.write(0x0C, 1, 0x10)
    dev.write(0x04, 2, 0x0406)
    dev.clear_write_log()
    dev.reset()
    assert dev.read(msi + 2, 2) & 1 == 0
    assert dev.read(0x0C, 1) == 0x10 and dev.read(0x04, 2) == 0x0406
    assert dev.write_log() == []                        # the kernel's accesses are not ours


def test_access_checks(host):
    dev = sim(host, "edu")
    for offset, size in ((1, 2), (2, 4), (0, 3), (256, 1), (-4, 4), (254, 4)):
        with pytest.raises(ValueError):
            dev.read(offset, size)
        with pytest.raises(ValueError):
            dev.write(offset, size, 0)
    with pytest.raises(ValueError):
        dev.write(0x3C, 1, 0x100)
    assert dev.write_log() == []


def test_sim_host(host):
    a = host.add("nvme")
    b = host.add("nvme", BDF(0, 2, 0, 0))
    assert a.bdf == BDF(0, 0, 0x0A, 0)                  # default: where it was captured
    assert host.devices() == [BDF(0, 0, 0x0A, 0), BDF(0, 2, 0, 0)]
    with pytest.raises(FileExistsError):
        host.add("edu", BDF(0, 2, 0, 0))
    a.write(0x3C, 1, 0x33)
    assert b.read(0x3C, 1) != 0x33                      # two attachments are two functions
    assert host.open(BDF(0, 0, 0x0A, 0)).read(0x3C, 1) == 0x33


def test_platform_opens_a_simulated_device_as_a_host_port(tmp_path):
    SimHost(tmp_path / "dom0" / "pci").add("edu", SIM_BDF)
    platform = SimPlatform(tmp_path / "dom0", 0)
    assert platform.assignable() == [SIM_BDF]
    dev = platform.open_device(SIM_BDF)
    assert isinstance(dev, SimDevice) and isinstance(dev, HostPort)
    assert dev.info.vendor == 0x1234


def test_writable_sysfs_device_bypasses_model(host):
    # Only against a simulation root: production dom0 uses writable=True on real sysfs.
    dev = sim(host, "edu")
    with SysfsDevice(SIM_BDF, root=host.root) as ro:
        with pytest.raises(PermissionError):
            ro.write(0x3C, 1, 5)
    with SysfsDevice(SIM_BDF, root=host.root, writable=True) as rw:
        rw.write(0x00, 2, 0xABCD)
    assert dev.read(0x00, 2) == 0xABCD and dev.write_log() == []


# --- cross-process ----------------------------------------------------------------------

def _child_write(root: str, bdf: str, offset: int, size: int, value: int) -> int:
    dev = SimDevice.open(Path(root), BDF.parse(bdf))
    dev.write(offset, size, value)
    dev.close()
    return os.getpid()


def _child_read(root: str, bdf: str, offset: int, size: int) -> int:
    with SimDevice.open(Path(root), BDF.parse(bdf)) as dev:
        return dev.read(offset, size)


def _child_size_bar(dev: SimDevice) -> int:
    dev.write(0x10, 4, 0xFFFFFFFF)                      # dev was pickled: reopened here
    return dev.read(0x10, 4)


def _child_hammer(root: str, bdf: str, offset: int, count: int) -> None:
    with SimDevice.open(Path(root), BDF.parse(bdf)) as dev:
        for i in range(count):
            dev.write(offset, 1, i & 0xFF)


def test_cross_process_visibility(host):
    dev = sim(host, "e1000e")
    args = (str(host.root), str(SIM_BDF))
    with SPAWN.Pool(1) as pool:
        child_pid = pool.apply(_child_write, (*args, 0x3C, 1, 0x5A))
        assert dev.read(0x3C, 1) == 0x5A
        assert [(r.offset, r.value, r.pid) for r in dev.write_log()] == [(0x3C, 0x5A, child_pid)]
        dev.write(0x0C, 1, 0x08)                         # parent writes, child sees it
        assert pool.apply(_child_read, (*args, 0x0C, 1)) == 0x08
        assert pool.apply(_child_size_bar, (dev,)) == 0xFFFE0000
    assert dev.read(0x10, 4) == 0xFFFE0000
    # A "restarted worker": a new process opening the device sees the same state.
    with SPAWN.Pool(1) as pool:
        assert pool.apply(_child_read, (*args, 0x3C, 1)) == 0x5A


def test_concurrent_writers_keep_log_consistent(host):
    dev = sim(host, "edu")
    args = (str(host.root), str(SIM_BDF))
    procs = [SPAWN.Process(target=_child_hammer, args=(*args, off, 200)) for off in (0x0C, 0x3C)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    log = dev.write_log()
    assert len(log) == 400
    for off in (0x0C, 0x3C):
        values = [r.value for r in log if r.offset == off]
        assert values == [i & 0xFF for i in range(200)]
        assert all(r.before == (r.value - 1) & 0xFF for r in log if r.offset == off and r.value)


# --- the model as a property ----------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["e1000e", "pcie-root-port", "nvme-sriov", "pci-bridge"]),
       size=st.sampled_from([1, 2, 4]), slot=st.integers(0, 1023), value=st.integers(0, 0xFFFFFFFF),
       dirty=st.integers(0, 0xFFFFFFFF))
def test_writes_respect_masks(tmp_path_factory, name, size, slot, value, dirty):
    dev = SimHost(tmp_path_factory.mktemp("prop")).add(name, SIM_BDF)
    offset = (slot * size) % dev.info.config_size
    value &= (1 << 8 * size) - 1
    if any(h[1] <= offset < h[1] + h[2] or offset <= h[1] < offset + size for h in dev.model.hooks):
        return                                            # value-dependent registers tested above
    rw = int.from_bytes(dev.model.rw[offset:offset + size], "little")
    rw1c = int.from_bytes(dev.model.rw1c[offset:offset + size], "little")
    dev.poke(offset, size, (dev.read(offset, size) | (dirty & rw1c)) & ((1 << 8 * size) - 1))
    before = dev.read(offset, size)
    dev.write(offset, size, value)
    after = dev.read(offset, size)
    ro = ~(rw | rw1c) & ((1 << 8 * size) - 1)
    assert after & ro == before & ro
    assert after & rw == value & rw
    assert after & rw1c == before & rw1c & ~value
    assert dev.write_log()[-1].after == after


# --- the real host (read-only) -----------------------------------------------------------------

def _host_vm_dump_for(bdf: BDF) -> str | None:
    name = f"host-vm-{bdf.bus:02x}.{bdf.dev:02x}.{bdf.fn}"
    return name if bdf.domain == 0 and name in list_dumps() else None


REAL = [b for b in list_host_devices() if _host_vm_dump_for(b)]


def test_real_host_lists_devices():
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.skip("no sysfs PCI bus")
    assert list_host_devices() == sorted(BDF.parse(n) for n in os.listdir("/sys/bus/pci/devices"))


@pytest.mark.skipif(not REAL, reason="this machine's PCI devices have no matching host-vm dump")
@pytest.mark.parametrize("bdf", REAL, ids=str)
def test_real_host_matches_dump_read_only(bdf):
    d = load_dump(_host_vm_dump_for(bdf))
    with SysfsDevice(bdf) as dev:
        assert fcntl.fcntl(dev._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert dev.info.config_size == len(d.config)
        assert (dev.info.vendor, dev.info.device, dev.info.class_code) == (
            d.ids["vendor"], d.ids["device"], d.ids["class"])
        assert dev.read(0x00, 2) == d.ids["vendor"]
        assert dev.read(0x02, 2) == d.ids["device"]
        assert dev.read(0x08, 4) >> 8 == d.ids["class"]
        assert dev.read(0x0E, 1) == d.config[0x0E]
        assert dev.read(0x2C, 4) == int.from_bytes(d.config[0x2C:0x30], "little")
        header = dev.read(0x00, 4)
        with pytest.raises(PermissionError):
            dev.write(0x3C, 1, 0)
        with pytest.raises(ValueError):
            dev.read(0x01, 2)
        assert dev.read(0x00, 4) == header


# --- SR-IOV identity and the bridges above a function, as sysfs shows them ----------------

def test_vf_has_a_physfn_link_and_the_kernels_ids(host):
    pf = host.add("nvme-sriov", BDF(0, 1, 0, 0))
    vf = host.add("nvme-vf", BDF(0, 1, 0, 2), physfn=BDF(0, 1, 0, 0))
    assert pf.info.physfn is None and not pf.info.is_virtfn
    assert vf.info.physfn == BDF(0, 1, 0, 0) and vf.info.is_virtfn
    assert (vf.info.vendor, vf.info.device) == (0x1B36, 0x0010)
    assert vf.read(0, 4) == 0xFFFFFFFF and vf.read(0x10, 4) == 0
    vf.write(0x10, 4, 0xFFFFFFFF)
    assert vf.read(0x10, 4) == 0                        # a VF's BARs are read-only zero
    with SysfsDevice(BDF(0, 1, 0, 2), root=host.root) as sysfs:
        assert sysfs.info == vf.info


def test_vf_dump_names_its_pf():
    assert load_dump("nvme-vf").physfn == BDF(0, 1, 0, 0)
    assert load_dump("nvme-sriov").physfn is None


def test_functions_behind_bridges_know_the_bridges_above_them(host):
    port = host.add("pcie-root-port", BDF(0, 0, 3, 0))
    bridge = host.add("pci-bridge", BDF(0, 1, 0, 0), bridge=BDF(0, 0, 3, 0))
    leaf = host.add("rtl8139", BDF(0, 2, 1, 0), bridge=BDF(0, 1, 0, 0))
    assert port.info.upstream == ()
    assert bridge.info.upstream == (BDF(0, 0, 3, 0),)
    assert leaf.info.upstream == (BDF(0, 0, 3, 0), BDF(0, 1, 0, 0))
    assert host.devices() == [BDF(0, 0, 3, 0), BDF(0, 1, 0, 0), BDF(0, 2, 1, 0)]
    assert SimDevice.open(host.root, BDF(0, 2, 1, 0)).info == leaf.info
    with pytest.raises(FileExistsError):
        host.add("rtl8139", BDF(0, 2, 1, 0))
    with pytest.raises(FileNotFoundError):
        host.add("edu", BDF(0, 5, 0, 0), bridge=BDF(0, 4, 0, 0))


def test_upstream_and_physfn_from_a_sysfs_shaped_tree(tmp_path):
    """sysfs lists functions as links into /sys/devices, nested under their bridges."""
    from pcibackd.hostpci.sysfs import devices_dir, physfn_of, upstream_of
    real = tmp_path / "sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0"
    vf = tmp_path / "sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.1"
    real.mkdir(parents=True)
    vf.mkdir()
    os.symlink("../0000:01:00.0", vf / "physfn")
    listing = devices_dir(tmp_path)
    listing.mkdir(parents=True)
    for d in (real, vf, real.parent):
        os.symlink(os.path.relpath(d, listing), listing / d.name)
    assert upstream_of(listing / "0000:01:00.0") == (BDF.parse("0000:00:1c.0"),)
    assert upstream_of(listing / "0000:00:1c.0") == ()
    assert physfn_of(listing / "0000:01:00.1") == BDF.parse("0000:01:00.0")
    assert physfn_of(listing / "0000:01:00.0") is None


def test_upstream_of_the_hosts_own_functions_never_fails():
    from pcibackd.hostpci.sysfs import devices_dir, upstream_of
    for bdf in list_host_devices():
        chain = upstream_of(devices_dir(Path("/")) / str(bdf))
        assert all(isinstance(b, BDF) for b in chain) and bdf not in chain
