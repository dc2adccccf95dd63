"""PM, VPD, PCIe control and extended space, checked against Linux xen-pciback's rules.

The facts (conf_space.c, conf_space_capability.c): PMCSR lets the guest
change only PME status (write 1 to clear) and data select, never PME enable,
whatever permissive says, and hands a power-state change to the PCI core; VPD
accepts only address writes with F clear and never a data write, permissive
or not; the PCI Express capability and everything from 0x100 on has no field
at all: reads come from the device, writes are dropped unless permissive, then
written as they are.  Each rule is also checked against random write sequences
that must never change a hardware bit outside it.
"""

from __future__ import annotations

import random

import pytest
from confspace_support import custom_dump

from pcibackd.confspace import DevicePolicy
from pcibackd.wire.pciif import Err

E1000E_PM = 0xC8
PMCSR = E1000E_PM + 4
PME_EN, PME_STATUS = 0x0100, 0x8000


# -- power management: PME enable and PME status --------------------------------------------

@pytest.mark.parametrize("permissive", [False, True])
def test_pme_enable_never_reaches_the_device(rig, permissive):
    r = rig("e1000e", DevicePolicy(permissive=permissive))
    for off, size, value in ((PMCSR, 2, PME_EN), (PMCSR + 1, 1, 0x01), (E1000E_PM + 4, 4, PME_EN),
                             (E1000E_PM, 4, 0xFFFFFFFF)):
        r.cs.write(off, size, value)
        assert not r.hw(PMCSR, 2) & PME_EN, (hex(off), size)


def test_pme_status_clears_only_when_the_guest_writes_1_to_it(rig):
    r = rig("e1000e")
    r.dev.poke(PMCSR, 2, PME_STATUS)
    for off, size, value in ((PMCSR, 2, 0), (E1000E_PM + 4, 4, 0x00000000),
                             (PMCSR, 1, 0xFF), (PMCSR + 1, 1, 0x01), (E1000E_PM, 4, 0)):
        r.cs.write(off, size, value)
        assert r.hw(PMCSR, 2) & PME_STATUS, (hex(off), size, hex(value))
    assert r.read(PMCSR, 2) & PME_STATUS                    # the guest sees it pending
    r.write(PMCSR + 1, 1, 0x80)
    assert not r.hw(PMCSR, 2) & PME_STATUS


def test_pme_status_through_a_dword_write_of_pm_header_and_pmcsr(rig):
    r = rig("e1000e")
    r.dev.poke(PMCSR, 2, PME_STATUS)
    dword = r.read(E1000E_PM + 4, 4)
    r.cs.write(E1000E_PM + 4, 4, dword & ~PME_STATUS)       # read-modify-write keeping 0
    assert r.hw(PMCSR, 2) & PME_STATUS
    r.cs.write(E1000E_PM + 4, 4, dword)                     # the bit written back as read: 1
    assert not r.hw(PMCSR, 2) & PME_STATUS


def test_random_pm_writes_change_only_pme_status_data_select_and_power_state(rig):
    r = rig("e1000e")
    rng = random.Random(3)
    allowed = PME_STATUS | 0x1E00 | 0x0003
    for _ in range(300):
        before = r.hw(PMCSR, 2)
        if rng.random() < 0.2:
            r.dev.poke(PMCSR, 2, before | PME_STATUS)
            before |= PME_STATUS
        size = rng.choice((1, 2, 4))
        off = rng.randrange(E1000E_PM, E1000E_PM + 8, size)
        r.cs.write(off, size, rng.getrandbits(8 * size))
        after = r.hw(PMCSR, 2)
        assert not (before ^ after) & ~allowed, (hex(off), size, hex(before), hex(after))
        assert not after & PME_EN
    assert r.hw(E1000E_PM + 2, 2) == r.dev.config_bytes()[E1000E_PM + 2] | \
        r.dev.config_bytes()[E1000E_PM + 3] << 8                                   # PMC untouched


# -- VPD ----------------------------------------------------------------------------------

def _vpd(rig, tmp_path, policy=None):
    path = custom_dump(tmp_path, "edu", {0x41: b"\x60", 0x60: bytes([0x03, 0, 0, 0, 1, 2, 3, 4])},
                       name="edu-vpd")
    return rig(path, policy)


@pytest.mark.parametrize("permissive", [False, True])
def test_a_guest_can_never_make_the_device_write_vpd(rig, tmp_path, permissive):
    """Linux's vpd_address_write refuses F=1 before permissive is looked at, and its data
    field has no write handler (so the write is handled: dropped even when permissive)."""
    r = _vpd(rig, tmp_path, DevicePolicy(permissive=permissive))
    r.write(0x62, 2, 0x8004, expect=Err.access_denied)
    r.write(0x60, 4, 0x80040003, expect=Err.access_denied)
    r.write(0x63, 1, 0x80, expect=Err.access_denied)
    r.write(0x64, 4, 0xCAFEF00D)
    assert not r.hw(0x62, 2) & 0x8000 and r.hw(0x64, 4) == 0x04030201
    rng = random.Random(permissive)
    for _ in range(200):
        size = rng.choice((1, 2, 4))
        r.cs.write(rng.randrange(0x60, 0x68, size), size, rng.getrandbits(8 * size))
        assert not r.hw(0x62, 2) & 0x8000 and r.hw(0x64, 4) == 0x04030201


def test_vpd_read_requests_reach_the_device(rig, tmp_path):
    r = _vpd(rig, tmp_path)
    for address in (0x0000, 0x0004, 0x7FFC):
        r.write(0x62, 2, address)
        assert r.hw(0x62, 2) == address


# -- PCI Express capability control registers ---------------------------------------------

# (dump, PCIe capability offset, control registers (offset in cap, a bit the device lets change))
PCIE_CONTROLS = [
    ("e1000e", 0xE0, {0x08: 0x0001}),                                  # DevCtl (RCiEP: no link)
    ("nvme-sriov", 0x80, {0x08: 0x0001, 0x10: 0x0008, 0x28: 0x0400}),  # + LnkCtl, DevCtl2
    ("pcie-root-port", 0x54, {0x08: 0x0001, 0x10: 0x0008, 0x18: 0x0001, 0x1C: 0x0001}),
]


@pytest.mark.parametrize("dump,base,controls", PCIE_CONTROLS)
def test_pcie_control_registers_read_through_and_drop_writes_unless_permissive(
        rig, dump, base, controls):
    r = rig(dump)
    for rel, bit in controls.items():
        off = base + rel
        before = r.hw(off, 2)
        assert r.read(off, 2) == before
        r.write(off, 2, before ^ bit)
        assert r.hw(off, 2) == before, (dump, hex(off))
    assert r.log() == []
    r.cs.permissive = True
    for rel, bit in controls.items():
        off = base + rel
        before = r.hw(off, 2)
        r.write(off, 2, before ^ bit)
        assert r.hw(off, 2) == before ^ bit, (dump, hex(off))


# -- extended configuration space (0x100 and up) --------------------------------------------

@pytest.mark.parametrize("dump", ["e1000e", "nvme-sriov", "pcie-root-port", "nvme-vf"])
def test_extended_space_reads_as_the_device_and_drops_writes(rig, dump):
    r = rig(dump)
    assert all(r.read(off, 4) == r.hw(off, 4) for off in range(0x100, 0x1000, 4))
    rng = random.Random(dump)
    before = r.dev.config_bytes()[0x100:]
    for _ in range(300):
        size = rng.choice((1, 2, 4))
        r.cs.write(rng.randrange(0x100, 0x1000, size), size, rng.getrandbits(8 * size))
    assert r.dev.config_bytes()[0x100:] == before and r.log() == []


def test_extended_space_written_through_when_permissive(rig):
    r = rig("nvme-sriov", DevicePolicy(permissive=True))
    ctl = 0x120 + 0x08                                  # SR-IOV control: VF Enable
    r.write(ctl, 2, r.hw(ctl, 2) | 0x0001)
    assert r.hw(ctl, 2) & 0x0001
