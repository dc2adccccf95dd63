"""Xen vPCI-harness style matrix: every register x every access size x every alignment.

For every shipped dump:

* reset values: every aligned 1/2/4-byte read of the whole config space equals a
  reference guest view built independently from the dump's files (IDs,
  resources, irq) and Linux's rules (``linux_oracle``, pciback-protocol.md §3);
* read-only bits stick and the device changes only in the bits the rules allow,
  for all-ones and all-zeros writes of every size at every alignment that
  touches each register;
* RW1C bits clear only where the guest may clear them; reserved bits read 0;
* BAR sizing needs an all-ones 32-bit write and reads back the size mask.
"""

from __future__ import annotations

import pytest
from confspace_support import ALL_DUMPS, FULL, accesses_covering, extract
from linux_oracle import linux_view

from pcibackd.confspace import DevicePolicy
from simdom0.dumps import load_dump
from pcibackd.wire.pciif import Err

IO, MEM, MASTER, MWI = 0x1, 0x2, 0x4, 0x10

# Device bits a non-permissive guest without interrupt control may change, by register.
ALLOWED_HW = {
    "command": IO | MEM | MASTER | MWI,       # IO/MEM only ever turned on (enable)
    "cache_line_size": 0xFF,
    "bist": 0x40,
    "pmcsr": 0x8000 | 0x1E00 | 0x0003,        # PME status (RW1C), data select, D-state
    "vpd_address": 0x7FFF,
}
GUEST_RW1C = {"pmcsr": 0x8000}


def reference_view(dump: str, hw: bytes) -> bytes:
    """The guest view at reset, from the dump's files and Linux's rules (``linux_oracle``)."""
    return linux_view(load_dump(dump), hw)


@pytest.mark.parametrize("dump", ALL_DUMPS)
def test_reset_value_of_every_access(rig, dump):
    r = rig(dump)
    ref = reference_view(dump, r.dev.config_bytes())
    size_cfg = len(ref)
    for size in (1, 2, 4):
        for off in range(0, size_cfg, size):
            assert r.read(off, size) == int.from_bytes(ref[off:off + size], "little"), \
                (hex(off), size)
    assert r.cs.guest_config_dump() == ref
    assert r.log() == []


def _hw_allowed(r) -> bytearray:
    """Per-byte mask of device bits this guest may change."""
    allowed = bytearray(r.cs.layout.config_size)
    for slot in r.cs.layout.table_slots():
        mask = ALLOWED_HW.get(slot.reg.name, 0)
        allowed[slot.offset:slot.end] = mask.to_bytes(slot.size, "little")
    return allowed


def _assert_hw_changes_allowed(r, allowed: bytearray, decode_before: int) -> None:
    for rec in r.log():
        for i in range(rec.size):
            changed = (rec.changed >> (8 * i)) & 0xFF
            assert changed & ~allowed[rec.offset + i] == 0, rec
    assert r.hw(4, 2) & (IO | MEM) & decode_before == decode_before   # decode never cleared


@pytest.mark.parametrize("dump", ALL_DUMPS)
def test_read_only_bits_stick_for_every_size_and_alignment(rig, dump):
    r = rig(dump)
    allowed = _hw_allowed(r)
    decode = r.hw(4, 2) & (IO | MEM)
    limit = r.cs.layout.config_size
    for slot in r.cs.layout.table_slots():
        ro = slot.reg.ro
        for off, size in accesses_covering(slot.offset, slot.size, limit):
            before = r.read(slot.offset, slot.size)
            hw_before = r.hw(slot.offset, slot.size)
            for pattern in (FULL[size], 0):
                err = r.cs.write(off, size, pattern)
                assert err in (Err.success, Err.access_denied), (slot, off, size)
                after = r.read(slot.offset, slot.size)
                assert (after ^ before) & ro == 0, (slot, hex(off), size, hex(pattern))
                # Non-emulated read-only bits also stick in the device itself.
                hw_ro = ro & ~slot.reg.emu & ~slot.reg.rw1c
                assert (r.hw(slot.offset, slot.size) ^ hw_before) & hw_ro == 0, slot
            _assert_hw_changes_allowed(r, allowed, decode)
            for bar_off in list(r.cs.state.sizing):            # leave sizing mode for the next slot
                r.write(bar_off, 4, r.cs.layout.bars[bar_off].val)


@pytest.mark.parametrize("dump", ALL_DUMPS)
def test_reserved_bits_read_zero(rig, dump):
    r = rig(dump)
    limit = r.cs.layout.config_size
    slots = [s for s in r.cs.layout.table_slots() if s.reg.rsvd]
    assert slots                                             # command at least
    for slot in slots:
        r.dev.poke(slot.offset, slot.size, r.hw(slot.offset, slot.size) | slot.reg.rsvd)
        for off, size in accesses_covering(slot.offset, slot.size, limit):
            got = r.read(off, size)
            rsvd = extract(slot.reg.rsvd, slot.offset, off, size) if off >= slot.offset else \
                (slot.reg.rsvd << (8 * (slot.offset - off))) & FULL[size]
            assert got & rsvd == 0, (slot, off, size)
        # The guest's reserved bits never reach the device; the device's own are preserved
        # (RsvdP) by any read-modify-write.
        r.dev.poke(slot.offset, slot.size, r.hw(slot.offset, slot.size) & ~slot.reg.rsvd)
        r.dev.clear_write_log()
        r.cs.write(slot.offset, slot.size, slot.reg.rsvd | (r.read(slot.offset, slot.size)
                                                            ^ slot.reg.wr))
        assert all(rec.value & slot.reg.rsvd == 0 for rec in r.log()), slot


@pytest.mark.parametrize("permissive", [False, True])
@pytest.mark.parametrize("dump", ["e1000e", "pci-bridge", "pcie-root-port", "nvme",
                                  "virtio-net-modern"])
def test_rw1c_bits(rig, dump, permissive):
    r = rig(dump, DevicePolicy(permissive=permissive))
    limit = r.cs.layout.config_size
    slots = [s for s in r.cs.layout.table_slots() if s.reg.rw1c]
    assert slots
    for slot in slots:
        rw1c = slot.reg.rw1c
        for off, size in accesses_covering(slot.offset, slot.size, limit):
            # Permissive passes an access only if it touches no register with a rule (Linux:
            # an access overlapping a field is handled by the fields alone).
            ruled = any(r.cs.layout.owner[p].reg.strict for p in range(off, off + size))
            clearable = rw1c if permissive and not ruled else GUEST_RW1C.get(slot.reg.name, 0)
            r.dev.poke(slot.offset, slot.size, r.hw(slot.offset, slot.size) | rw1c)
            r.cs.write(off, size, 0)
            assert r.hw(slot.offset, slot.size) & rw1c == rw1c, (slot, off, size)
            r.cs.write(off, size, FULL[size])
            touched = (FULL[size] << (8 * (off - slot.offset)) if off >= slot.offset
                       else FULL[size] >> (8 * (slot.offset - off))) & FULL[slot.size]
            expect_set = rw1c & ~(clearable & touched)
            assert r.hw(slot.offset, slot.size) & rw1c == expect_set, (slot, off, size)
            r.cs.write(4, 2, r.read(4, 2) & ~0x0003 | (r.hw(4, 2) & 0x3))  # keep command sane


@pytest.mark.parametrize("dump", ["e1000e", "virtio-net", "megasas-gen2", "pci-bridge"])
def test_bar_sizing_matrix(rig, dump):
    r = rig(dump)
    for off, bar in r.cs.layout.bars.items():
        for aoff, size in accesses_covering(off, 4, 0x40):
            if not off <= aoff < off + 4:
                continue
            r.write(aoff, size, FULL[size])
            expect = bar.size_val if size == 4 else bar.val
            assert r.read(off, 4) == expect, (hex(off), hex(aoff), size)
            assert r.read(aoff, size) == extract(expect, off, aoff, size)
            r.write(off, 4, bar.val)
            assert r.read(off, 4) == bar.val
    assert r.log() == []
