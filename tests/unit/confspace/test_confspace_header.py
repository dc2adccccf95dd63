"""Header rules of Linux xen-pciback (pciback-protocol.md §3.2-3.4), one test per rule."""

from __future__ import annotations

import pytest

from pcibackd.confspace import DevicePolicy
from pcibackd.confspace.header import COMMAND_GUEST
from pcibackd.wire.pciregs import (
    COMMAND_FAST_B2B as FAST_B2B, COMMAND_INTX_DISABLE as INTX_DISABLE, COMMAND_IO as IO,
    COMMAND_MASTER as MASTER, COMMAND_MEM as MEM, COMMAND_MWI as MWI, COMMAND_PARITY as PARITY,
    COMMAND_SERR as SERR, COMMAND_SPECIAL as SPECIAL)
from simdom0.dumps import load_dump


def test_vendor_device_are_cached_and_read_only(rig):
    r = rig("e1000e")
    assert r.read(0, 4) == 0x10D38086
    r.write(0, 4, 0x12345678)
    r.write(0, 2, 0)
    assert r.read(0, 4) == 0x10D38086
    assert r.log() == []
    assert r.cs.denied_writes == 2


def test_vendor_read_does_not_touch_the_device(rig):
    """Vendor/device come from the cached IDs even if the device's bytes change."""
    r = rig("edu")
    r.dev.poke(0, 4, 0xFFFFFFFF)
    assert r.read(0, 2) == 0x1234 and r.read(2, 2) == 0x11E8


def test_command_guest_view_is_virtual_and_decode_never_cleared(rig):
    """XSA-120: writing 0 leaves hardware MEM/IO on; the guest sees its own value."""
    r = rig("e1000e")
    hw_before = r.hw(4, 2)
    assert hw_before & (IO | MEM) == IO | MEM
    r.write(4, 2, 0)
    assert r.read(4, 2) == 0
    assert r.hw(4, 2) & (IO | MEM) == IO | MEM
    assert r.hw(4, 2) & (SERR | PARITY) == hw_before & (SERR | PARITY)
    for rec in r.log():
        assert rec.changed & ~(MASTER | MWI) == 0, rec


def test_command_bus_master_reaches_hardware(rig):
    r = rig("e1000e")
    r.write(4, 2, IO | MEM | MASTER)
    assert r.hw(4, 2) & MASTER
    assert r.read(4, 2) & MASTER
    r.write(4, 2, IO | MEM)
    assert not r.hw(4, 2) & MASTER


def test_command_enable_turns_on_decode_of_owned_resources(rig):
    """Setting MEM on a device whose decode is off enables what its BARs need."""
    r = rig("e1000e")
    r.dev.poke(4, 2, 0)                       # firmware left decode off
    r = r.rebuild()
    r.dev.clear_write_log()
    r.write(4, 2, MEM)
    assert r.hw(4, 2) & (IO | MEM) == IO | MEM   # e1000e has I/O and memory BARs
    assert r.read(4, 2) & (IO | MEM) == MEM      # guest sees what it wrote


def test_command_disable_clears_only_bus_master(rig):
    r = rig("e1000e")
    r.write(4, 2, IO | MEM | MASTER)
    r.dev.clear_write_log()
    r.write(4, 2, MASTER)                     # decode off in the guest's view, master kept
    hw = r.hw(4, 2)
    assert hw & (IO | MEM) == IO | MEM
    assert hw & MASTER                        # the guest's master bit is applied after disabling


def test_command_serr_parity_are_virtual_only(rig):
    r = rig("edu")
    hw = r.hw(4, 2)
    r.write(4, 2, hw ^ (SERR | PARITY))
    assert r.hw(4, 2) & (SERR | PARITY) == hw & (SERR | PARITY)
    assert r.read(4, 2) & (SERR | PARITY) == (hw ^ (SERR | PARITY)) & (SERR | PARITY)


def test_command_other_guest_bits_need_permissive(rig):
    """SPECIAL/VGA/WAIT/FAST_B2B reach hardware only in permissive mode (as in Linux)."""
    r = rig("edu")
    hw = r.hw(4, 2)
    r.write(4, 2, hw | SPECIAL | FAST_B2B)
    assert r.hw(4, 2) & (SPECIAL | FAST_B2B) == 0
    assert r.read(4, 2) & (SPECIAL | FAST_B2B) == 0
    assert r.cs.denied_writes == 1
    r.cs.permissive = True
    r.write(4, 2, hw | SPECIAL | FAST_B2B)
    assert r.hw(4, 2) & (SPECIAL | FAST_B2B) == SPECIAL | FAST_B2B
    # ... but even permissive cannot clear decode or touch SERR/PARITY (XSA-120).
    r.write(4, 2, 0)
    assert r.hw(4, 2) & (IO | MEM) == hw & (IO | MEM)


def test_command_intx_disable_needs_interrupt_control(rig):
    r = rig("edu")
    hw = r.hw(4, 2)
    assert not hw & INTX_DISABLE
    r.write(4, 2, hw | INTX_DISABLE)
    assert not r.hw(4, 2) & INTX_DISABLE
    assert r.read(4, 2) & INTX_DISABLE           # virtual bit
    r.cs.allow_interrupt_control = True
    r.write(4, 2, hw | INTX_DISABLE)
    assert r.hw(4, 2) & INTX_DISABLE
    r.write(4, 2, hw)
    assert not r.hw(4, 2) & INTX_DISABLE


def test_command_reserved_bits_read_zero_and_are_dropped(rig):
    r = rig("edu")
    hw = r.hw(4, 2)
    r.write(4, 2, hw | 0xF800)
    assert r.read(4, 2) & 0xF800 == 0
    assert r.hw(4, 2) & 0xF800 == 0
    assert r.cs.denied_writes == 1


def test_status_is_read_through_and_rw1c_protected(rig):
    r = rig("e1000e")
    r.dev.poke(6, 2, r.hw(6, 2) | 0x2000)        # received master abort latched
    assert r.read(6, 2) & 0x2000
    r.write(6, 2, 0xFFFF)
    assert r.hw(6, 2) & 0x2000                   # not cleared: status is not guest-writable
    assert r.log() == []
    # A command write through a 4-byte access must not clear the latched status bit.
    r.write(4, 4, r.read(4, 4))
    assert r.hw(6, 2) & 0x2000


def test_status_writable_in_permissive_mode(rig):
    r = rig("e1000e", DevicePolicy(permissive=True))
    r.dev.poke(6, 2, r.hw(6, 2) | 0x2000)
    r.write(6, 2, 0x2000)
    assert not r.hw(6, 2) & 0x2000


def test_cache_line_size_written_through(rig):
    r = rig("edu")
    r.write(0x0C, 1, 0x10)
    assert r.hw(0x0C, 1) == 0x10 and r.read(0x0C, 1) == 0x10


def test_latency_timer_ignored(rig):
    r = rig("edu")
    before = r.hw(0x0D, 1)
    r.write(0x0D, 1, 0x40)
    assert r.hw(0x0D, 1) == before
    assert r.log() == []


@pytest.mark.parametrize("value, reaches", [(0x40, True), (0x00, False), (0x41, False),
                                            (0xC0, False)])
def test_bist_narrow_rule(rig, value, reaches):
    """BIST is written only as exactly START, or with every other bit unchanged."""
    r = rig("edu")
    r.dev.poke(0x0F, 1, 0x00)
    r.write(0x0F, 1, value)
    logged = [rec for rec in r.log() if rec.offset == 0x0F]
    assert bool(logged) == reaches


def test_interrupt_line_is_host_irq_and_pin_real(rig):
    d = load_dump("pci-bridge")
    r = rig("pci-bridge")
    assert r.read(0x3C, 1) == d.irq & 0xFF
    assert d.config[0x3C] != d.irq                # the virtualization is visible here
    assert r.read(0x3D, 1) == d.config[0x3D]
    r.write(0x3C, 1, 0x05)
    r.write(0x3D, 1, 0x04)
    assert r.read(0x3C, 2) == (d.config[0x3D] << 8) | d.irq
    assert r.log() == []


def test_interrupt_line_inside_wider_read(rig):
    """Unlike Linux's overlap test, a dword read at 0x3c also shows the emulated line."""
    d = load_dump("qemu-xhci")
    r = rig("qemu-xhci")
    assert r.read(0x3C, 4) & 0xFF == d.irq & 0xFF


def test_bridge_windows_and_bus_numbers_read_only_even_permissive(rig):
    r = rig("pci-bridge", DevicePolicy(permissive=True))
    before = r.hw(0x18, 4), r.hw(0x1C, 2), r.hw(0x20, 4), r.hw(0x24, 4), r.hw(0x28, 4)
    for off in (0x18, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x30):
        r.write(off, 4 if off != 0x1C else 2, 0)
    assert (r.hw(0x18, 4), r.hw(0x1C, 2), r.hw(0x20, 4), r.hw(0x24, 4), r.hw(0x28, 4)) == before
    # The dword at 0x18 touches the bus numbers, so none of it passes (as Linux treats an
    # access touching a field); secondary latency alone does.
    assert r.log() == []
    r.write(0x1B, 1, 0)
    assert [rec.offset for rec in r.log()] == [0x1B]


def test_bridge_control_writable_only_permissive(rig):
    r = rig("pci-bridge")
    before = r.hw(0x3E, 2)
    r.write(0x3E, 2, before ^ 0x0001)
    assert r.hw(0x3E, 2) == before
    r.cs.permissive = True
    r.write(0x3E, 2, before ^ 0x0001)
    assert r.hw(0x3E, 2) == before ^ 0x0001


def test_command_guest_constant_matches_linux():
    assert COMMAND_GUEST == 0x02BC
