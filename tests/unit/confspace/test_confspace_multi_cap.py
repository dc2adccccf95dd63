"""A function with two MSI capabilities (or two PM ones): only the first is "the" capability.

Linux's xen-pciback registers its fields at ``pci_find_capability``'s answer,
the first capability with the ID (and the kernel's ``dev->msi_cap`` is that
one too); a second capability of the same ID gets no field: its header and
body are read-only to the guest.  The MSI/MSI-X exclusivity check looks at
the first MSI capability only.
"""

from __future__ import annotations

import random

import pytest
from confspace_support import custom_dump

from pcibackd.confspace import DevicePolicy
from pcibackd.wire.pciif import Err

MSI1, MSIX, MSI2, PM2 = 0xD0, 0xA0, 0x60, 0x70


@pytest.fixture
def two_msi(rig, tmp_path):
    """e1000e with a second 64-bit MSI capability at 0x60 (and a second PM at 0x70), linked
    after MSI-X (the list's last entry)."""
    path = custom_dump(tmp_path, "e1000e", {
        MSIX + 1: bytes([MSI2]),
        MSI2: bytes([0x05, PM2, 0x80, 0x00]),           # MSI, 64-bit, enable clear
        PM2: bytes([0x01, 0x00, 0x03, 0xF8, 0x00, 0x01]),  # PM with PME support + PME enable
    }, name="e1000e-two-msi")
    r = rig(path)
    r.cs.allow_interrupt_control = True
    return r


def test_golden_second_msi_is_header_only(two_msi):
    r = two_msi
    layout = r.cs.layout
    names = {s.reg.name for s in layout.table_slots() if MSI2 <= s.offset < MSI2 + 14}
    assert names == {"cap_header"}
    names = {s.reg.name for s in layout.table_slots() if PM2 <= s.offset < PM2 + 8}
    assert names == {"cap_header"}
    # The guest walks both (nothing hidden); the second MSI reads as the device has it.
    assert r.read(MSIX, 2) >> 8 == MSI2 and r.read(MSI2, 2) >> 8 == PM2
    assert r.read(MSI2, 4) == r.hw(MSI2, 4)
    # The second PM is not "the" PM: no PME masking, no PME-enable clearing at build.
    assert r.read(PM2 + 2, 2) == r.hw(PM2 + 2, 2) == 0xF803
    assert r.hw(PM2 + 4, 2) & 0x0100


def test_second_msi_enable_never_reaches_the_device(two_msi):
    r = two_msi
    flags = r.read(MSI2 + 2, 2)
    r.write(MSI2 + 2, 2, flags | 1)
    assert not r.hw(MSI2 + 2, 2) & 1
    assert r.log() == []
    r.write(MSI1 + 2, 2, r.read(MSI1 + 2, 2) | 1)     # the first one is hooked
    assert r.hw(MSI1 + 2, 2) & 1


def test_exclusivity_checks_the_first_msi_only(two_msi):
    r = two_msi
    r.dev.poke(MSI2 + 2, 2, r.hw(MSI2 + 2, 2) | 1)    # a second MSI the device has enabled
    r.write(MSIX + 2, 2, r.read(MSIX + 2, 2) | 0x8000)
    assert r.hw(MSIX + 2, 2) & 0x8000
    r.write(MSI1 + 2, 2, r.read(MSI1 + 2, 2) | 1, expect=Err.access_denied)


def test_no_guest_write_reaches_a_second_capability(two_msi):
    r = two_msi
    rng = random.Random(7)
    before = bytes(r.hw(off, 1) for off in range(MSI2, PM2 + 8))
    for _ in range(400):
        size = rng.choice((1, 2, 4))
        off = rng.randrange(MSI2, PM2 + 8, size)
        r.cs.write(off, size, rng.getrandbits(8 * size))
    assert bytes(r.hw(off, 1) for off in range(MSI2, PM2 + 8)) == before
    assert [rec for rec in r.log() if MSI2 <= rec.offset < PM2 + 8] == []


def test_permissive_writes_a_second_msi_body_but_never_its_header(rig, tmp_path):
    path = custom_dump(tmp_path, "e1000e", {MSIX + 1: bytes([MSI2]),
                                             MSI2: bytes([0x05, 0x00, 0x80, 0x00])}, name="p")
    r = rig(path, DevicePolicy(permissive=True))
    r.write(MSI2, 2, 0)
    assert r.hw(MSI2, 2) == 0x0005
    r.write(MSI2 + 2, 2, 0x0081)
    assert r.hw(MSI2 + 2, 2) & 1                       # permissive: as Linux, unhandled bits pass
