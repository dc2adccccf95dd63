"""The op dispatcher on bytes: table lookup, device lookup, write-back rules."""

import errno

import pytest

from pcibackd.worker.ops import (Dispatcher, Outcome, Reply, ServiceHistogram, classify, code_name, snapshot_op,
                                 write_reply)
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


def test_stats_count_ops_misses_and_errors(disp):
    disp.dispatch(op_bytes(Op.conf_read, devfn=8))
    disp.dispatch(op_bytes(Op.conf_read, devfn=9))           # an empty slot: a miss
    disp.dispatch(op_bytes(Op.conf_write, devfn=9))
    disp.dispatch(op_bytes(77))
    assert disp.stats.served == {"conf_read": 2, "conf_write": 1, "unknown": 1}
    assert disp.stats.misses == {"conf_read": {"XEN_PCI_ERR_dev_not_found": 1},
                                 "conf_write": {"XEN_PCI_ERR_dev_not_found": 1}}
    assert disp.stats.errors == {"unknown": {"XEN_PCI_ERR_not_implemented": 1}}
    assert disp.stats.error_count == 1


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


# ------------------------------------------------- misses versus errors --
@pytest.mark.parametrize("cmd,err,offset,outcome", [
    (Op.conf_read, Err.success, 0, Outcome.OK),
    (Op.enable_msix, Err.success, 0, Outcome.OK),
    (Op.conf_read, Err.dev_not_found, 0, Outcome.MISS),           # enumeration of an empty slot
    (Op.conf_read, Err.dev_not_found, 0x100, Outcome.MISS),
    (Op.conf_write, Err.dev_not_found, 4, Outcome.MISS),          # a function on its way out
    (Op.conf_read, Err.invalid_offset, 0x100, Outcome.MISS),      # the extended-space probe
    (Op.conf_read, Err.invalid_offset, 0x104, Outcome.ERROR),
    (Op.conf_read, Err.invalid_offset, 1, Outcome.ERROR),
    (Op.conf_write, Err.invalid_offset, 0x100, Outcome.ERROR),
    (Op.conf_read, Err.access_denied, 0, Outcome.ERROR),
    (Op.conf_write, Err.access_denied, 4, Outcome.ERROR),
    (Op.conf_read, Err.op_failed, 0, Outcome.ERROR),
    (Op.enable_msi, Err.dev_not_found, 0, Outcome.ERROR),          # not a probe: the guest named the device
    (Op.enable_msix, -errno.EINVAL, 0, Outcome.ERROR),
    (77, Err.not_implemented, 0x100, Outcome.ERROR),
])
def test_classify(cmd, err, offset, outcome):
    assert classify(cmd, err, offset) is outcome


@pytest.mark.parametrize("cmd,err,name", [
    (Op.conf_read, Err.invalid_offset, "XEN_PCI_ERR_invalid_offset"),
    (Op.conf_write, Err.access_denied, "XEN_PCI_ERR_access_denied"),
    (Op.enable_msi, Err.op_failed, "XEN_PCI_ERR_op_failed"),
    (Op.enable_msix, Err.dev_not_found, "XEN_PCI_ERR_dev_not_found"),
    (Op.enable_msix, -errno.EINVAL, "-EINVAL"),
    (Op.enable_msix, -errno.EIO, "-EIO"),                          # not op_failed: msix answers errnos
    (Op.enable_msix, -errno.ENOSPC, "-ENOSPC"),
    (Op.conf_read, -errno.ENOSPC, "-ENOSPC"),
    (Op.conf_read, -100000, "err_-100000"),
    (Op.conf_read, 7, "err_7"),
])
def test_code_names_are_symbolic(cmd, err, name):
    assert code_name(cmd, err) == name


def test_the_extended_space_probe_of_a_conventional_function_is_a_miss():
    class Conventional(FakeDev):
        def read(self, off, size):
            return (Err.invalid_offset, 0) if off >= 0x100 else (Err.success, 0)
    d = Dispatcher({(0, 0, 8): Conventional()})
    assert d.dispatch(op_bytes(Op.conf_read, devfn=8, offset=0x100)).err == Err.invalid_offset
    assert d.stats.misses == {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}} and d.stats.errors == {}
    d.dispatch(op_bytes(Op.conf_read, devfn=8, offset=0x200))
    assert d.stats.errors == {"conf_read": {"XEN_PCI_ERR_invalid_offset": 1}}


def test_service_histogram_buckets_are_le():
    h = ServiceHistogram((10, 100))
    for ns in (1, 10_000, 10_001, 100_000, 100_001, 10 ** 9):
        h.add(ns)
    assert h.counts == [2, 2, 2] and h.sum_ns == 1 + 10_000 + 10_001 + 100_000 + 100_001 + 10 ** 9
