"""BARs whose host resource the kernel refused, fixed or shadowed, checked against Linux's rules.

Linux's bar_init (conf_space_header.c) shows a BAR as ``start | low four flag
bits`` with sizing read-back ``-size | low four flag bits``, except that a
resource with no flags, or marked IORESOURCE_UNSET / _DISABLED / _BUSY, reads
0 and sizes to 0.  ``linux_oracle.linux_bar`` is that rule written from the facts;
the guest view of every case is compared with it, and every guest write
sequence (sizing, restore, random values) is checked to leave the device's
BAR registers alone.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from confspace_support import mem_port
from linux_oracle import linux_bar

from pcibackd.confspace import ConfSpace
from pcibackd.hostpci.port import Resource

U32 = 0xFFFFFFFF
UNSET, DISABLED, BUSY = (Resource.IORESOURCE_UNSET, Resource.IORESOURCE_DISABLED,
                         Resource.IORESOURCE_BUSY)
FIXED, SHADOW = Resource.IORESOURCE_PCI_FIXED, Resource.IORESOURCE_ROM_SHADOW
MEM, IO, MEM64 = Resource.IORESOURCE_MEM, Resource.IORESOURCE_IO, Resource.IORESOURCE_MEM_64
ZERO = Resource(0, 0, 0)


def _port(dump: str, lines: dict[int, Resource]):
    port = mem_port(dump)
    res = list(port.info.resources) + [ZERO] * (7 - len(port.info.resources))
    for index, r in lines.items():
        res[index] = r
    port.info = replace(port.info, resources=tuple(res))
    return port


def _offset(index: int) -> int:
    return 0x30 if index == 6 else 0x10 + 4 * index


E1000E_BAR0 = Resource(0xFDCC0000, 0xFDCDFFFF, 0x40200)
NVME_BAR0 = Resource(0xFEAA4000, 0xFEAA7FFF, 0x140204)            # 64-bit memory
CASES = {
    "unset": ("e1000e", {0: replace(E1000E_BAR0, flags=E1000E_BAR0.flags | UNSET)}),
    "disabled": ("e1000e", {0: replace(E1000E_BAR0, flags=E1000E_BAR0.flags | DISABLED)}),
    "busy": ("e1000e", {0: replace(E1000E_BAR0, flags=E1000E_BAR0.flags | BUSY)}),
    "unset-64bit": ("nvme", {0: replace(NVME_BAR0, start=0, end=0x3FFF,
                                        flags=NVME_BAR0.flags | UNSET)}),
    "disabled-64bit-large": ("nvme", {0: Resource(0, 0, NVME_BAR0.flags | UNSET | DISABLED)}),
    "unset-rom": ("e1000e", {6: Resource(0xFDA00000, 0xFDA3FFFF, 0x46200 | UNSET)}),
    # pci_setup_device's legacy IDE quirk: IORESOURCE_IO | IORESOURCE_PCI_FIXED at 0x1f0.
    "legacy-ide": ("ich9-ahci", {0: Resource(0x1F0, 0x1F7, IO | FIXED),
                                 1: Resource(0x3F6, 0x3F6, IO | FIXED)}),
    # pci_fixup_video: the ROM is the shadow copy at 0xC0000.
    "vga-shadow-rom": ("e1000e", {6: Resource(0xC0000, 0xDFFFF, MEM | SHADOW | FIXED)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_guest_bars_follow_linux(case):
    dump, lines = CASES[case]
    port = _port(dump, lines)
    cs = ConfSpace.build(port)
    for index in range(7):
        off = _offset(index)
        value, size_val = linux_bar(port.info.resources, index)
        assert cs.read(off, 4) == (0, value), (case, hex(off))
        sizing = 0xFFFFF800 if index == 6 else U32
        assert cs.write(off, 4, sizing) == 0
        assert cs.read(off, 4) == (0, size_val), (case, hex(off))
        assert cs.write(off, 4, value) == 0
        assert cs.read(off, 4) == (0, value)
    assert cs.denied_writes == 0


def test_vga_shadow_rom_shows_the_shadow_bit():
    port = _port("e1000e", {6: Resource(0xC0000, 0xDFFFF, MEM | SHADOW | FIXED)})
    cs = ConfSpace.build(port)
    assert cs.read(0x30, 4) == (0, 0xC0002)
    cs.write(0x30, 4, 0xFFFFF800)
    assert cs.read(0x30, 4) == (0, 0xFFFE0002)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_guest_write_sequence_touches_a_refused_or_fixed_bar(case):
    dump, lines = CASES[case]
    port = _port(dump, lines)
    offsets = {_offset(i) for i in lines}
    if lines.get(0, ZERO).flags & MEM64:
        offsets.add(0x14)
    for off in offsets:                       # the device no longer holds what the kernel shows
        port.cfg[off:off + 4] = (0x12345000).to_bytes(4, "little")
    before = {off: port.read(off, 4) for off in offsets}
    cs = ConfSpace.build(port)
    port.writes.clear()
    rng = random.Random(case)
    values = [U32, 0xFFFFF800, 0xFFFFFFFE, 0, 0x1F0, 0xC0002, 0x12345000]
    for off in sorted(offsets):
        shown = cs.read(off, 4)[1]
        for value in values + [shown] + [rng.getrandbits(32) for _ in range(50)]:
            cs.write(off, 4, value)
            cs.write(off, 4, shown)           # a guest "restoring" what it read
        for size in (1, 2):
            for sub in range(0, 4, size):
                cs.write(off + sub, size, rng.getrandbits(8 * size))
    assert [w for w in port.writes if w[0] in offsets or w[0] - w[0] % 4 in offsets] == []
    assert {off: port.read(off, 4) for off in offsets} == before


def test_restore_still_repairs_an_assigned_bar():
    """The one BAR write Linux does (the captured address, after the device lost it) stays."""
    port = _port("e1000e", {})
    cs = ConfSpace.build(port)
    port.cfg[0x10:0x14] = bytes(4)
    cs.write(0x10, 4, 0xFDCC0000)
    assert port.writes == [(0x10, 4, 0xFDCC0000)]


@pytest.mark.parametrize("written", [0xFFFFF800, 0xFFFFFFFE, U32])
def test_rom_sizing_without_a_rom_is_not_refused(rig, written):
    r = rig("edu")                                  # no expansion ROM
    assert r.read(0x30, 4) == 0
    r.write(0x30, 4, written)
    assert r.read(0x30, 4) == 0
    r.write(0x30, 4, 0)
    assert r.cs.denied_writes == 0
    assert r.log() == []


def test_vf_bars_show_the_kernels_resource_and_are_never_written(rig):
    """A VF's BAR registers read 0; the guest sees the kernel's resource (as Linux's bar_init)
    and restoring it writes nothing (the register is read-only: its PF places the VF)."""
    r = rig("nvme-vf")
    assert r.hw(0x10, 4) == 0 and r.read(0x10, 4) == 0xFE804004 and r.read(0x14, 4) == 0
    r.write(0x10, 4, U32)
    r.write(0x14, 4, U32)
    assert (r.read(0x10, 4), r.read(0x14, 4)) == (0xFFFFC004, U32)
    r.write(0x10, 4, 0xFE804004)
    r.write(0x14, 4, 0)
    assert [rec for rec in r.log() if 0x10 <= rec.offset < 0x28] == []
    assert r.cs.denied_writes == 0
