"""Malformed hardware must not break the build, and the hot path stays one port read."""

from __future__ import annotations

import pytest
from confspace_support import mem_port
from hypothesis import given, settings
from hypothesis import strategies as st

from pcibackd.confspace import ConfSpace, UnsupportedDevice
from simdom0.dumps import load_dump
from pcibackd.wire.pciif import Err


def _patched(dump: str, patches: dict[int, bytes]) -> bytes:
    cfg = bytearray(load_dump(dump).config)
    for off, data in patches.items():
        cfg[off:off + len(data)] = data
    return bytes(cfg)


@pytest.mark.parametrize("patches", [
    {0x41: b"\x40"},                                   # edu MSI points to itself
    {0x34: b"\x3c"},                                   # pointer into the header
    {0x34: b"\xfe", 0xFC: b"\x05\x00"},                # cap runs past 0x100 (masked to 0xfc)
    {0x41: b"\x44"},                                   # next cap overlaps MSI's registers
    {0x40: b"\xff"},                                   # ID 0xff ends the walk
])
def test_malformed_legacy_lists(patches):
    port = mem_port("edu", _patched("edu", patches))
    cs = ConfSpace.build(port)
    assert len(cs.guest_config_dump()) == 256
    for off in range(0, 256, 4):
        assert cs.read(off, 4)[0] == Err.success
        assert cs.write(off, 4, 0xFFFFFFFF) in (Err.success, Err.access_denied)


@pytest.mark.parametrize("patches", [
    {0x102: b"\x01\x10"},                              # AER next -> itself (0x100)
    {0x142: b"\x01\x00"},                              # DSN next -> 0x000 + version bits
    {0x100: b"\xff\xff\xff\xff"},                      # no extended list
    {0x142: b"\xf1\xff"},                              # next -> 0xffc: header at the very end
])
def test_malformed_extended_lists(patches):
    port = mem_port("e1000e", _patched("e1000e", patches))
    cs = ConfSpace.build(port)
    assert len(cs.guest_config_dump()) == 4096


def test_unsupported_header_type():
    with pytest.raises(UnsupportedDevice):
        ConfSpace.build(mem_port("edu", _patched("edu", {0x0E: b"\x02"})))


@settings(max_examples=150, deadline=None)
@given(dump=st.sampled_from(["edu", "e1000e", "pci-bridge", "virtio-net"]),
       noise=st.lists(st.tuples(st.integers(0x34, 0xFF), st.integers(0, 255)), max_size=40))
def test_random_capability_garbage_never_breaks_build(dump, noise):
    cfg = bytearray(load_dump(dump).config)
    cfg[0x06] |= 0x10
    for off, byte in noise:
        cfg[off] = byte
    cs = ConfSpace.build(mem_port(dump, bytes(cfg)))
    dump_view = cs.guest_config_dump()
    assert len(dump_view) == len(cfg)
    # Every byte is owned by exactly one slot and slots never overlap.
    owner = cs.layout.owner
    assert all(s.offset <= i < s.end for i, s in enumerate(owner))


def test_plain_read_is_one_port_read_and_emulated_reads_none():
    port = mem_port("e1000e")
    cs = ConfSpace.build(port)
    port.reads = 0
    assert cs.read(0xE8, 2)[0] == Err.success           # PCIe DevCtl: pass-through
    assert cs.read(0x108, 4)[0] == Err.success          # extended space
    assert port.reads == 2
    port.reads = 0
    cs.read(0x10, 4)                                    # BAR: fully emulated
    cs.read(0x00, 4)                                    # vendor/device
    cs.read(0x3C, 1)                                    # interrupt line
    assert port.reads == 0
    cs.read(0x04, 4)                                    # command/status: one read, merged
    assert port.reads == 1
