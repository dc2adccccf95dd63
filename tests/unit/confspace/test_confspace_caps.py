"""Capability rules (pciback-protocol.md §3.5-3.6): PM, VPD, MSI, MSI-X, extended space."""

from __future__ import annotations

from confspace_support import custom_dump

from pcibackd.confspace import DevicePolicy
from pcibackd.wire.pciif import Err

E1000E_PM, E1000E_MSI, E1000E_MSIX, E1000E_PCIE = 0xC8, 0xD0, 0xA0, 0xE0


def _pm_rig(rig, tmp_path, pmc_extra=0xF800 | 0x0200, pmcsr=0x0100):
    from simdom0.dumps import load_dump
    cfg = load_dump("e1000e").config
    pmc = int.from_bytes(cfg[0xCA:0xCC], "little") | pmc_extra
    path = custom_dump(tmp_path, "e1000e", {0xCA: pmc.to_bytes(2, "little"),
                                             0xCC: pmcsr.to_bytes(2, "little")})
    return rig(path)


# -- power management -----------------------------------------------------------------

def test_pm_pme_support_masked_and_pme_enable_cleared_at_init(rig, tmp_path):
    r = _pm_rig(rig, tmp_path)
    assert r.hw(0xCA, 2) & 0xF800 == 0xF800
    assert r.read(0xCA, 2) & 0xF800 == 0
    assert r.read(0xC8, 4) >> 16 & 0xF800 == 0          # also through a dword read
    assert r.hw(0xCC, 2) & 0x0100 == 0                  # cleared in hardware at build


def test_pm_pme_enable_cannot_be_set(rig):
    r = rig("e1000e")
    r.write(0xCC, 2, 0x0100)
    assert r.hw(0xCC, 2) & 0x0100 == 0
    assert r.cs.denied_writes == 1


def test_pm_pme_status_rw1c_and_data_select_pass(rig):
    r = rig("e1000e")
    r.dev.poke(0xCC, 2, 0x8000)
    assert r.read(0xCC, 2) & 0x8000
    r.write(0xCC, 2, 0x0000)                           # writing 0 keeps it
    assert r.hw(0xCC, 2) & 0x8000
    r.write(0xCC, 2, 0x8000)                           # writing 1 clears it
    assert not r.hw(0xCC, 2) & 0x8000


def test_pm_d_state_change_goes_to_device(rig):
    r = rig("e1000e")
    r.write(0xCC, 2, 0x0003)                            # D3hot
    assert r.hw(0xCC, 2) & 3 == 3
    r.write(0xCC, 2, 0x0000)                            # back to D0
    assert r.hw(0xCC, 2) & 3 == 0


def test_pm_unsupported_d_state_refused(rig):
    r = rig("e1000e")                                   # D1/D2 not supported
    r.write(0xCC, 2, 0x0001, expect=Err.access_denied)
    assert r.hw(0xCC, 2) & 3 == 0
    assert r.log() == []


def test_pm_invalid_transition_refused(rig, tmp_path):
    r = _pm_rig(rig, tmp_path, pmcsr=0)                 # D1 supported
    r.write(0xCC, 2, 0x0003)
    r.write(0xCC, 2, 0x0001, expect=Err.access_denied)  # D3hot -> D1 is not allowed
    assert r.hw(0xCC, 2) & 3 == 3
    r.write(0xCC, 2, 0x0000)
    r.write(0xCC, 2, 0x0001)
    assert r.hw(0xCC, 2) & 3 == 1


# -- VPD (no shipped dump has it: add one to edu's list) -------------------------------

def _vpd_rig(rig, tmp_path):
    path = custom_dump(tmp_path, "edu", {0x41: b"\x60", 0x60: bytes([0x03, 0, 0, 0, 1, 2, 3, 4])},
                       name="edu-vpd")
    return rig(path)


def test_vpd_read_request_allowed_write_refused(rig, tmp_path):
    r = _vpd_rig(rig, tmp_path)
    r.write(0x62, 2, 0x0010)                           # read request at address 0x10
    assert r.hw(0x62, 2) == 0x0010
    r.write(0x62, 2, 0x8010, expect=Err.access_denied)  # F set: a VPD write
    assert r.hw(0x62, 2) == 0x0010
    r.write(0x64, 4, 0xDEADBEEF)                       # data is read-only
    assert r.hw(0x64, 4) == 0x04030201
    assert [rec.offset for rec in r.log()] == [0x62]


# -- MSI / MSI-X control ----------------------------------------------------------------

def test_msi_enable_denied_without_interrupt_control(rig):
    r = rig("e1000e")
    flags = r.read(E1000E_MSI + 2, 2)
    r.write(E1000E_MSI + 2, 2, flags | 1, expect=Err.access_denied)
    r.write(E1000E_MSI + 2, 2, flags)                  # unchanged value: fine
    assert r.log() == []
    assert r.cs.denied_writes == 1


def test_msi_only_enable_bit_even_with_interrupt_control(rig):
    r = rig("e1000e")
    r.cs.allow_interrupt_control = True
    flags = r.read(E1000E_MSI + 2, 2)
    r.write(E1000E_MSI + 2, 2, flags | 0x0010, expect=Err.access_denied)   # multiple message
    r.write(E1000E_MSI + 2, 2, flags | 1)
    assert r.hw(E1000E_MSI + 2, 2) & 1
    r.write(E1000E_MSI + 2, 2, flags)
    assert not r.hw(E1000E_MSI + 2, 2) & 1


def test_msix_enable_and_maskall(rig):
    r = rig("e1000e")
    r.cs.allow_interrupt_control = True
    base = r.read(E1000E_MSIX + 2, 2)
    r.write(E1000E_MSIX + 2, 2, base | 0xC000)
    assert r.hw(E1000E_MSIX + 2, 2) & 0xC000 == 0xC000
    r.write(E1000E_MSIX + 2, 2, base | 0x8000 | 0x0001, expect=Err.access_denied)  # table size RO


def test_msi_and_msix_mutually_exclusive(rig):
    r = rig("e1000e")
    r.cs.allow_interrupt_control = True
    r.write(E1000E_MSIX + 2, 2, r.read(E1000E_MSIX + 2, 2) | 0x8000)
    r.write(E1000E_MSI + 2, 2, r.read(E1000E_MSI + 2, 2) | 1, expect=Err.access_denied)
    assert not r.hw(E1000E_MSI + 2, 2) & 1
    r.write(E1000E_MSIX + 2, 2, r.read(E1000E_MSIX + 2, 2) & ~0x8000)
    r.write(E1000E_MSI + 2, 2, r.read(E1000E_MSI + 2, 2) | 1)
    r.write(E1000E_MSIX + 2, 2, r.read(E1000E_MSIX + 2, 2) | 0x8000, expect=Err.access_denied)


def test_msi_flags_permissive_write_through(rig):
    r = rig("e1000e", DevicePolicy(permissive=True))
    r.write(E1000E_MSI + 2, 2, r.read(E1000E_MSI + 2, 2) | 1)
    assert r.hw(E1000E_MSI + 2, 2) & 1


def test_msi_message_registers_read_only_even_permissive(rig):
    r = rig("pci-bridge", DevicePolicy(permissive=True))   # 64-bit, maskable MSI at 0x4c
    for off in (0x50, 0x54, 0x58, 0x5C, 0x60):
        r.write(off, 4, 0xFFFFFFFF)
    assert r.log() == []


def test_msix_table_pba_read_only(rig):
    r = rig("e1000e")
    table, pba = r.hw(E1000E_MSIX + 4, 4), r.hw(E1000E_MSIX + 8, 4)
    r.write(E1000E_MSIX + 4, 4, 0x12345678)
    r.write(E1000E_MSIX + 8, 4, 0x12345678)
    assert (r.read(E1000E_MSIX + 4, 4), r.read(E1000E_MSIX + 8, 4)) == (table, pba)
    assert r.log() == []


def test_write_spanning_msi_flags_and_neighbour_stops_at_denial(rig):
    """XSA-128 shape: a dword at the MSI header carries a flags change: nothing is written."""
    r = rig("edu")
    r.cs.permissive = False
    dword = r.read(0x40, 4)
    r.write(0x40, 4, dword | 0x10000, expect=Err.access_denied)
    assert r.log() == []


def test_cap_headers_read_only(rig):
    r = rig("e1000e", DevicePolicy(permissive=True))
    for off in (E1000E_PM, E1000E_MSI, E1000E_PCIE, E1000E_MSIX):
        before = r.read(off, 2)
        r.write(off, 2, 0)
        assert r.read(off, 2) == before
    assert r.log() == []


# -- unowned capability bodies and extended space ------------------------------------------

def test_pcie_body_read_through_dropped_unless_permissive(rig):
    r = rig("e1000e")
    devctl = E1000E_PCIE + 8
    before = r.hw(devctl, 2)
    assert r.read(devctl, 2) == before
    r.write(devctl, 2, before ^ 0x0001)
    assert r.hw(devctl, 2) == before and r.log() == []
    r.cs.permissive = True
    r.write(devctl, 2, before ^ 0x0001)
    assert r.hw(devctl, 2) == before ^ 0x0001


def test_extended_space_read_through_writes_dropped(rig):
    r = rig("e1000e")
    assert r.read(0x100, 4) == r.hw(0x100, 4)
    assert r.read(0x108, 4) == r.hw(0x108, 4)
    mask = r.hw(0x108, 4)                              # AER uncorrectable mask (RW in hw)
    r.write(0x108, 4, mask ^ 0x10)
    r.write(0xFFC, 4, 0xFFFFFFFF)
    assert r.log() == []
    assert r.cs.denied_writes == 2
    r.cs.permissive = True
    r.write(0x108, 4, mask ^ 0x10)
    assert r.hw(0x108, 4) == mask ^ 0x10


def test_256_byte_device_has_no_extended_space(rig):
    r = rig("edu")
    assert r.cs.read(0x100, 4) == (Err.invalid_offset, 0)
    assert r.cs.write(0x100, 4, 0) == Err.invalid_offset
