"""BARs and ROM: captured at init, sizing works, a guest can never move a BAR."""

from __future__ import annotations

import pytest

from simdom0.dumps import load_dump

U32 = 0xFFFFFFFF


def _expected(dump: str) -> dict[int, tuple[int, int]]:
    """BAR offset -> (value, sizing read-back), worked out from the sysfs resource lines."""
    d = load_dump(dump)
    res = d.resources
    out = {}
    i = 0
    while i < 6:
        off = 0x10 + 4 * i
        start, end, flags = res[i].start, res[i].end, res[i].flags
        size = end - start + 1 if flags else 0
        if not flags:
            out[off] = (0, 0)
        elif flags & 0x100:                     # I/O
            out[off] = (start | 1, (-size & U32) | 1)
        elif flags & 0x100000:                  # 64-bit memory: two dwords
            low = flags & 0xF
            out[off] = ((start & U32) | low, (-size & U32) | low)
            out[off + 4] = (start >> 32, (-size >> 32) & U32)
            i += 1
        else:
            out[off] = (start | (flags & 0xF), (-size & U32) | (flags & 0xF))
        i += 1
    rom = res[6]
    out[0x30] = ((rom.start, -(rom.end - rom.start + 1) & 0xFFFFF800) if rom.flags else (0, 0))
    return out


@pytest.mark.parametrize("dump", ["e1000e", "virtio-net", "megasas-gen2", "host-vm-00.01.0",
                                  "rtl8139", "pci-testdev"])
def test_bar_values_and_sizing(rig, dump):
    r = rig(dump)
    hw_bars = {off: r.hw(off, 4) for off in range(0x10, 0x34, 4)}
    for off, (value, size_mask) in _expected(dump).items():
        assert r.read(off, 4) == value, hex(off)
        r.write(off, 4, U32)
        assert r.read(off, 4) == size_mask, hex(off)
        assert r.read(off, 2) == size_mask & 0xFFFF
        assert r.read(off + 3, 1) == size_mask >> 24
        r.write(off, 4, value)
        assert r.read(off, 4) == value
    assert {off: r.hw(off, 4) for off in range(0x10, 0x34, 4)} == hw_bars
    assert r.log() == []
    assert r.cs.denied_writes == 0


def test_io_bar_sizing_ignores_low_bits(rig):
    r = rig("e1000e")                           # BAR2 is I/O
    r.write(0x18, 4, 0xFFFFFFFC)
    assert r.read(0x18, 4) == 0xFFFFFFE1


def test_mem_bar_sizing_ignores_flag_bits(rig):
    r = rig("e1000e")
    r.write(0x10, 4, 0xFFFFFFF0)
    assert r.read(0x10, 4) == 0xFFFE0000


def test_rom_sizing_with_enable_bit_and_without(rig):
    r = rig("e1000e")
    for written in (0xFFFFF800, 0xFFFFFFFE, 0xFFFFFFFF):
        r.write(0x30, 4, written)
        assert r.read(0x30, 4) == 0xFFFC0000          # 256K, enable not supported (as Linux)
    r.write(0x30, 4, 0xFFFFF000)                      # not all address bits set: not sizing
    assert r.read(0x30, 4) == 0xFDA00000


def test_relocation_is_ignored_and_counted(rig):
    r = rig("e1000e")
    r.write(0x10, 4, U32)
    r.write(0x10, 4, 0xC0000000)                       # "move" after sizing
    assert r.read(0x10, 4) == 0xFDCC0000
    r.write(0x14, 2, 0x1234)                          # partial write
    r.write(0x1C, 1, 0xFF)
    assert r.read(0x14, 4) == 0xFDCE0000
    assert r.hw(0x10, 4) == 0xFDCC0000
    assert r.log() == []
    assert r.cs.denied_writes == 3


def test_byte_writes_never_enter_sizing(rig):
    """Sizing needs one 32-bit write (as in Linux); four byte writes are ignored."""
    r = rig("e1000e")
    for i in range(4):
        r.write(0x10 + i, 1, 0xFF)
    assert r.read(0x10, 4) == 0xFDCC0000


def test_restore_repairs_hardware(rig):
    """Writing the captured value back restores a BAR the hardware lost (Linux's repair)."""
    r = rig("edu")
    r.dev.poke(0x10, 4, 0)                            # e.g. after a device reset
    r.write(0x10, 4, 0xFC000000)
    assert r.hw(0x10, 4) == 0xFC000000
    [rec] = r.log()
    assert (rec.offset, rec.size, rec.value) == (0x10, 4, 0xFC000000)


def test_unimplemented_bar_reads_zero_and_sizes_to_zero(rig):
    r = rig("edu")
    assert r.read(0x14, 4) == 0
    r.write(0x14, 4, U32)
    assert r.read(0x14, 4) == 0
    assert r.log() == []


def test_bridge_bars_and_rom(rig):
    r = rig("pci-bridge")                              # BAR0 64-bit memory, 256 bytes
    assert r.read(0x10, 4) == 0xFD600004 and r.read(0x14, 4) == 0
    r.write(0x10, 4, U32)
    r.write(0x14, 4, U32)
    assert r.read(0x10, 4) == 0xFFFFFF04 and r.read(0x14, 4) == U32
    assert r.read(0x38, 4) == 0
    assert r.log() == []
