"""The op dispatcher on bytes: table lookup, device lookup, write-back rules."""

import pytest

from pcibackd.worker.ops import Dispatcher, Reply, snapshot_op, write_reply
from pcibackd.wire import pciif
from pcibackd.wire.pciif import Err, Op


class FakeDev:
    def __init__(self):
        self.writes = []

    def read(self, off, size):
        return Err.success, 0x11E81234 if off == 0 else off

    def write(self, off, size, value):
        self.writes.append((off, size, value))
        return Err.success


def op_bytes(cmd, domain=0, bus=0, devfn=0, offset=0, size=4, value=0, info=0):
    return pciif.OP_HEADER.pack(cmd, 0, domain, bus, devfn, offset, size, value, info) + bytes(512)


@pytest.fixture
def disp():
    return Dispatcher({(0, 0, 0x08): FakeDev()})


def test_conf_read_found(disp):
    assert disp.dispatch(op_bytes(Op.conf_read, devfn=0x08)) == Reply(0, 0x11E81234)


def test_conf_write_reaches_device(disp):
    r = disp.dispatch(op_bytes(Op.conf_write, devfn=0x08, offset=0x0c, size=1, value=0x10))
    assert r.err == 0 and disp.devices[(0, 0, 8)].writes == [(0x0c, 1, 0x10)]


@pytest.mark.parametrize("domain,bus,devfn", [(0, 0, 0), (1, 0, 8), (0, 1, 8), (0, 0, 0x108), (0x10000, 0, 8),
                                              (0, 0x100, 8)])
def test_unknown_device_and_aliases(disp, domain, bus, devfn):
    # devfn/bus/domain out of range must not alias onto 00:01.0
    assert disp.dispatch(op_bytes(Op.conf_read, domain, bus, devfn)).err == Err.dev_not_found


@pytest.mark.parametrize("cmd", [Op.enable_msi, Op.disable_msi, Op.enable_msix, Op.disable_msix,
                                 Op.aer_detected, Op.enable_multi_msi, 11, 0xFFFFFFFF])
def test_unknown_or_unimplemented_cmd(disp, cmd):
    assert disp.dispatch(op_bytes(cmd, devfn=8)).err == Err.not_implemented


def test_stats_count_ops_and_errors(disp):
    disp.dispatch(op_bytes(Op.conf_read, devfn=8))
    disp.dispatch(op_bytes(Op.conf_read, devfn=9))
    disp.dispatch(op_bytes(77))
    assert disp.stats.served == {"conf_read": 2, "unknown": 1}
    assert disp.stats.errors == {"dev_not_found": 1, "not_implemented": 1}


def test_snapshot_is_a_private_copy():
    page = bytearray(4096)
    pciif.OP_HEADER.pack_into(page, pciif.SH_OP, Op.conf_read, 0, 0, 0, 8, 0, 4, 0, 0)
    snap = snapshot_op(page)
    page[pciif.SH_OP] = Op.conf_write       # the guest changes the page afterwards (XSA-155)
    assert pciif.OP_HEADER.unpack_from(snap)[0] == Op.conf_read
    assert len(snap) == pciif.PCI_OP.size


def test_write_reply_touches_only_err_value_and_used_vectors():
    page = bytearray(b"\xAA" * 4096)
    write_reply(page, Reply(-3, 0x12345678, (7, 9)))
    expect = bytearray(b"\xAA" * 4096)
    expect[8:12] = (-3).to_bytes(4, "little", signed=True)
    expect[32:36] = (0x12345678).to_bytes(4, "little")
    expect[40:42] = (7).to_bytes(2, "little")
    expect[44:46] = (9).to_bytes(2, "little")
    assert page == expect
