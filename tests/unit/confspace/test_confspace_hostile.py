"""Hostile guests: every write outside policy leaves the simulated device untouched.

Assertions are on the SimDevice write log (what reached the hardware), not on
the guest's view.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from confspace_support import ALL_DUMPS, make_rig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcibackd.wire.pciif import Err

IO, MEM, MASTER, MWI = 0x1, 0x2, 0x4, 0x10
INVALID = Err.invalid_offset


# -- access checks ------------------------------------------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.one_of(st.integers(-2**40, 2**40), st.integers(-8, 4104)),
       size=st.one_of(st.integers(-8, 16), st.sampled_from([1, 2, 4])),
       value=st.integers(0, 2**32 - 1))
def test_invalid_accesses_rejected_without_side_effects(rig_e1000e, offset, size, value):
    r = rig_e1000e
    valid = size in (1, 2, 4) and offset % size == 0 and 0 <= offset <= 4096 - size
    err, got = r.cs.read(offset, size)
    if valid:
        assert err == Err.success
    else:
        assert (err, got) == (INVALID, 0)
        assert r.cs.write(offset, size, value) == INVALID
        assert r.log() == []


def test_non_integer_arguments_rejected(rig):
    r = rig("edu")
    for args in ((True, 1), (0, True), (0.0, 4), ("0", 4), (None, 4), (0, [4])):
        assert r.cs.read(*args) == (INVALID, 0)
        assert r.cs.write(*args, 0) == INVALID
    assert r.cs.write(0, 4, "1") == INVALID
    assert r.cs.denied_writes == 0


# -- explicit hostile sequences ---------------------------------------------------------------

def test_sizing_then_relocating_every_bar(rig):
    r = rig("e1000e")
    for off in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        r.write(off, 4, 0xFFFFFFFF)
        r.write(off, 4, 0x80000000)
        r.write(off, 2, 0x0000)
        r.write(off + 2, 2, 0x8000)
        assert r.read(off, 4) == r.cs.layout.bars[off].val
    assert r.log() == []
    assert r.cs.denied_writes >= 14           # each move to 0x8000xxxx at least


def test_write_across_cache_line_latency_header_bist(rig):
    """One dword at 0x0c: only the cache-line byte reaches the device."""
    r = rig("edu")
    before = r.hw(0x0C, 4)
    r.write(0x0C, 4, 0x3F7F7F20)                     # BIST bits other than START differ
    assert r.hw(0x0C, 4) == (before & ~0xFF) | 0x20
    assert [(rec.offset, rec.size) for rec in r.log()] == [(0x0C, 1)]
    assert r.cs.denied_writes == 1


def test_write_across_interrupt_line_and_pin(rig):
    r = rig("e1000e")
    r.write(0x3C, 2, 0xFFFF)
    r.write(0x3C, 4, 0xFFFFFFFF)
    assert r.log() == []


def test_command_and_status_dword_write(rig):
    """A dword write at 0x04 (NetBSD style) with status bits set does not clear them."""
    r = rig("e1000e")
    r.dev.poke(6, 2, r.hw(6, 2) | 0xF900)
    dword = r.read(4, 4)
    r.write(4, 4, dword | MASTER)
    assert r.hw(6, 2) & 0xF900 == 0xF900
    assert r.hw(4, 2) & MASTER
    assert all(rec.offset == 4 and rec.size == 2 for rec in r.log())


def test_clearing_decode_repeatedly(rig):
    r = rig("virtio-net")
    decode = r.hw(4, 2) & (IO | MEM)
    for value in (0, MASTER, 0, IO, 0, MEM, 0):
        r.write(4, 2, value)
        r.write(4, 1, value & 0xFF)
        assert r.hw(4, 2) & decode == decode
        assert r.read(4, 2) & (IO | MEM) == value & (IO | MEM)
    assert all(rec.changed & ~(MASTER | MWI | IO | MEM) == 0 for rec in r.log())


def test_toggling_msi_and_msix_bits(rig):
    r = rig("e1000e")
    for off, size in ((0xD2, 2), (0xD2, 1), (0xD3, 1), (0xD0, 4), (0xA2, 2), (0xA3, 1),
                      (0xA0, 4)):
        r.write(off, size, 0xFFFFFFFF & ((1 << 8 * size) - 1), expect=Err.access_denied)
    assert r.log() == []
    assert r.cs.denied_writes == 7


def test_writing_reserved_and_unowned_bytes(rig):
    r = rig("e1000e")
    for off in (0x35, 0x36, 0x38, 0x40, 0x44, 0x7C, 0x104, 0x1000 - 4):
        r.write(off, 1, 0xFF)
    r.write(0x38, 4, 0xFFFFFFFF)
    assert r.log() == []


def test_hidden_capability_bytes_read_zero_and_ignore_writes(rig):
    from pcibackd.confspace import DevicePolicy
    r = rig("e1000e", DevicePolicy(permissive=True, hidden_caps=frozenset({0x11})))
    assert r.read(0xA0, 4) == 0 and r.read(0xA4, 4) == 0
    r.write(0xA2, 2, 0xC000)
    assert r.log() == []


# -- random hostile write sequences -----------------------------------------------------------

ALLOWED_HW = {"command": IO | MEM | MASTER | MWI, "cache_line_size": 0xFF, "bist": 0x40,
              "pmcsr": 0x9E03, "vpd_address": 0x7FFF}


def _allowed_bytes(cs) -> bytearray:
    allowed = bytearray(cs.layout.config_size)
    for slot in cs.layout.table_slots():
        mask = ALLOWED_HW.get(slot.reg.name, 0)
        allowed[slot.offset:slot.end] = mask.to_bytes(slot.size, "little")
    return allowed


def _draw_writes(data, cs, max_size=40):
    """Writes biased towards the device's registers: any size and alignment touching them."""
    offsets = sorted({slot.offset for slot in cs.layout.table_slots()})
    limit = cs.layout.config_size

    def one(size):
        near = st.sampled_from(offsets).map(lambda o: o - o % size)
        anywhere = st.integers(0, limit // size - 1).map(lambda i: i * size)
        value = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 0xFFFFFFFF]))
        return st.tuples(st.one_of(near, near, anywhere), st.just(size), value)
    access = st.sampled_from([1, 2, 4]).flatmap(one)
    return data.draw(st.lists(access, min_size=5, max_size=max_size))


@settings(max_examples=60, deadline=None)
@given(dump=st.sampled_from(ALL_DUMPS), data=st.data())
def test_random_write_sequences_stay_inside_policy(dump, data):
    with tempfile.TemporaryDirectory() as tmp:
        r = make_rig(Path(tmp), dump)
        cs = r.cs
        allowed = _allowed_bytes(cs)
        bars_hw = r.dev.config_bytes()[0x10:0x3C]
        decode = r.hw(4, 2) & (IO | MEM)
        for offset, size, value in _draw_writes(data, cs):
            assert cs.write(offset, size, value) in (Err.success, Err.access_denied)
            err, _ = cs.read(offset, size)
            assert err == Err.success
        for rec in r.log():
            for i in range(rec.size):
                changed = (rec.changed >> (8 * i)) & 0xFF
                assert changed & ~allowed[rec.offset + i] == 0, rec
        assert r.hw(4, 2) & decode == decode
        config = r.dev.config_bytes()
        header_type = config[0x0E] & 0x7F
        assert config[0x10:0x28 if header_type == 0 else 0x18] == \
            bars_hw[:0x18 if header_type == 0 else 0x08]
        for off, bar in cs.layout.bars.items():
            assert cs.read(off, 4)[1] in (bar.val, bar.size_val)


FROZEN_CAP_REGS = {"cap_header", "msi_address_lo", "msi_address_hi", "msi_data", "msi_ext_data",
                   "msi_reserved", "msi_mask", "msi_pending", "msix_table", "msix_pba"}


@settings(max_examples=40, deadline=None)
@given(dump=st.sampled_from(["e1000e", "pci-bridge", "pcie-root-port", "nvme-sriov",
                             "virtio-net", "megasas-gen2"]), data=st.data())
def test_permissive_with_interrupt_control_still_keeps_the_hard_rules(dump, data):
    """Even fully opened up, a guest cannot move BARs, clear decode, touch SERR/PARITY,
    rewrite bridge routing, cap headers or MSI messages / MSI-X table location."""
    from pcibackd.confspace import DevicePolicy
    with tempfile.TemporaryDirectory() as tmp:
        r = make_rig(Path(tmp), dump, DevicePolicy(permissive=True))
        cs = r.cs
        cs.allow_interrupt_control = True
        frozen = bytearray(cs.layout.config_size)      # device bits that must never change
        frozen[0x10:0x3C] = b"\xff" * 0x2C              # BARs, ROM, bridge routing, cap pointer
        if cs.layout.header_type == 1:
            frozen[0x1B] = 0                           # secondary latency: ordinary register
            frozen[0x1E:0x20] = bytes(2)               # secondary status (RW1C, permissive)
        for slot in cs.layout.table_slots():
            if slot.reg.name in FROZEN_CAP_REGS:
                frozen[slot.offset:slot.end] = b"\xff" * slot.size
        decode = r.hw(4, 2) & 0x0003
        serr_parity = r.hw(4, 2) & 0x0140
        before = r.dev.config_bytes()
        for offset, size, value in _draw_writes(data, cs):
            cs.write(offset, size, value)
        after = r.dev.config_bytes()
        for i, mask in enumerate(frozen):
            assert (before[i] ^ after[i]) & mask == 0, hex(i)
        assert r.hw(4, 2) & decode == decode
        assert r.hw(4, 2) & 0x0140 == serr_parity
