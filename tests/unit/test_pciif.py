"""Pins the pciif.h wire layout (sizes, offsets, constants)."""

import struct

from pcibackd.wire import pciif
from pcibackd.wire.pciif import Err, Op, XenbusState


def test_struct_sizes():
    assert pciif.MSIX_ENTRY.size == 4
    assert pciif.PCI_OP.size == 548
    assert pciif.AER_OP.size == 20
    assert pciif.SHAREDINFO.size == 572
    assert pciif.OP_HEADER.size == 36


def test_op_field_offsets():
    # Pack distinct values and find each one at its documented offset.
    values = [0x11111111, -2, 0x33333333, 0x44444444, 0x55555555, -6, 4, 0x88888888, 0x99999999]
    raw = pciif.OP_HEADER.pack(*values) + bytes(512)
    for off, fmt, v in [(0, "<I", values[0]), (4, "<i", -2), (8, "<I", values[2]), (12, "<I", values[3]),
                        (16, "<I", values[4]), (20, "<i", -6), (24, "<i", 4), (28, "<I", values[7]),
                        (32, "<I", values[8])]:
        assert struct.unpack_from(fmt, raw, off)[0] == v
    assert pciif.OP_MSIX_ENTRIES == 36


def test_sharedinfo_offsets():
    assert pciif.SH_OP == 4
    assert pciif.SH_AER_OP == 552
    assert pciif.SH_OP_ERR == 8 and pciif.SH_OP_VALUE == 32 and pciif.SH_OP_INFO == 36
    assert pciif.msix_vector_offset(0) == 40 and pciif.msix_vector_offset(127) == 40 + 4 * 127
    fields = list(range(1, 1 + 1 + 9 + 256 + 5))
    raw = pciif.SHAREDINFO.pack(*fields)
    assert struct.unpack_from("<I", raw, 552)[0] == fields[1 + 9 + 256]       # aer_op.cmd
    assert struct.unpack_from("<H", raw, 40)[0] == fields[1 + 9]               # msix_entries[0].vector
    assert struct.unpack_from("<H", raw, 42)[0] == fields[1 + 9 + 1]           # msix_entries[0].entry


def test_constants():
    assert [o.value for o in Op] == list(range(11))
    assert [e.value for e in Err] == [0, -1, -2, -3, -4, -5]
    assert (pciif._XEN_PCIF_active, pciif._XEN_PCIB_AERHANDLER, pciif._XEN_PCIB_active) == (0, 1, 2)
    assert pciif.SH_INFO_MAX_VEC == 128
    assert pciif.XEN_PCI_MAGIC == "7"
    assert [s.value for s in XenbusState] == list(range(9))
    assert XenbusState.Reconfigured == 8 and XenbusState.Connected == 4
