"""The real Physdev against fakes of libxenctrl/libxencall: arguments, buffers, errnos, config access."""

import ctypes
import errno
import os
import struct

import pytest

from pcibackd.platform import xen
from pcibackd.platform.api import PlatformError
from pcibackd.platform.physdev import (HYPERVISOR_PHYSDEV_OP, MAP_PIRQ_TYPE_MSI_SEG, PHYSDEVOP_MAP_PIRQ,
                                       PHYSDEVOP_PREPARE_MSIX, PHYSDEVOP_RELEASE_MSIX,
                                       PHYSDEVOP_RESTORE_MSI_EXT, RealPhysdev)
from pcibackd.wire.bdf import BDF

B = BDF.parse("0000:00:07.0")
SEG = BDF.parse("0002:03:1f.5")


class FakeCtrl:
    def __init__(self):
        self.calls, self.opened, self.closed, self.err, self.next_pirq = [], 0, 0, 0, 55

    def xc_interface_open(self, *a):
        self.opened += 1
        return 0x1000

    def xc_interface_close(self, xch):
        self.closed += 1
        return 0

    def xc_physdev_map_pirq_msi(self, xch, domid, index, pirq_ref, devfn, bus, entry, table_base):
        pirq = ctypes.cast(pirq_ref, ctypes.POINTER(ctypes.c_int)).contents
        self.calls.append(("map", domid, index, pirq.value, devfn, bus, entry, table_base))
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        pirq.value = self.next_pirq
        return 0

    def xc_physdev_unmap_pirq(self, xch, domid, pirq):
        self.calls.append(("unmap", domid, pirq))
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        return 0


class FakeCall:
    """libxencall stand-in: the buffer is real memory; xencall2 records what it holds."""

    def __init__(self):
        self.calls, self.err, self.freed, self.closed = [], 0, 0, 0
        self.mem = ctypes.create_string_buffer(64)
        self.reply_pirq = None

    def xencall_open(self, logger, flags):
        return 0x2000

    def xencall_close(self, h):
        self.closed += 1
        return 0

    def xencall_alloc_buffer(self, h, size):
        assert size >= 40
        return ctypes.addressof(self.mem)

    def xencall_free_buffer(self, h, buf):
        self.freed += 1

    def xencall2(self, h, op, cmd, buf):
        assert buf == ctypes.addressof(self.mem)
        self.calls.append((op, cmd, bytes(self.mem.raw)))
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        if self.reply_pirq is not None:
            struct.pack_into("<i", self.mem, 12, self.reply_pirq)
        return 0


@pytest.fixture
def fakes():
    ctrl, call = FakeCtrl(), FakeCall()
    return ctrl, call, RealPhysdev({"ctrl": ctrl, "call": call}.__getitem__)


def test_pci_device_ops_go_through_xencall_with_the_4_byte_struct(fakes):
    _ctrl, call, pd = fakes
    pd.prepare_msix(B)
    pd.release_msix(SEG)
    pd.restore_msi(B)
    assert [(op, cmd, raw[:4]) for op, cmd, raw in call.calls] == [
        (HYPERVISOR_PHYSDEV_OP, PHYSDEVOP_PREPARE_MSIX, bytes([0, 0, 0, 7 << 3])),
        (HYPERVISOR_PHYSDEV_OP, PHYSDEVOP_RELEASE_MSIX, bytes([2, 0, 3, 0x1F << 3 | 5])),
        (HYPERVISOR_PHYSDEV_OP, PHYSDEVOP_RESTORE_MSI_EXT, bytes([0, 0, 0, 7 << 3])),
    ]
    assert all(raw[4:] == bytes(60) for _op, _cmd, raw in call.calls)   # nothing left from an earlier call


def test_a_refused_op_carries_xens_errno(fakes):
    _ctrl, call, pd = fakes
    call.err = errno.EBUSY
    with pytest.raises(OSError) as e:
        pd.prepare_msix(B)
    assert e.value.errno == errno.EBUSY


def test_map_on_segment_0_uses_libxenctrl(fakes):
    ctrl, call, pd = fakes
    assert pd.map_pirq(5, "msix", B, 3, 0xFEBC0000) == 55
    assert pd.map_pirq(5, "msi", B, 0, 0) == 55
    assert ctrl.calls == [("map", 5, -1, -1, 7 << 3, 0, 3, 0xFEBC0000), ("map", 5, -1, -1, 7 << 3, 0, 0, 0)]
    assert call.calls == []


def test_map_on_another_segment_uses_msi_seg(fakes):
    ctrl, call, pd = fakes
    call.reply_pirq = 77
    assert pd.map_pirq(9, "msix", SEG, 2, 0xE0000000) == 77
    (op, cmd, raw), = call.calls
    assert (op, cmd) == (HYPERVISOR_PHYSDEV_OP, PHYSDEVOP_MAP_PIRQ)
    domid, = struct.unpack_from("<H", raw, 0)
    typ, index, _pirq, bus, devfn, entry = struct.unpack_from("<6i", raw, 4)
    table_base, = struct.unpack_from("<Q", raw, 32)
    assert (domid, typ, index, bus, devfn, entry, table_base) == \
        (9, MAP_PIRQ_TYPE_MSI_SEG, -1, 2 << 16 | 3, 0x1F << 3 | 5, 2, 0xE0000000)
    assert ctrl.calls == []


def test_kind_and_table_base_must_agree(fakes):
    _ctrl, _call, pd = fakes
    with pytest.raises(PlatformError):
        pd.map_pirq(5, "msix", B, 0, 0)
    with pytest.raises(PlatformError):
        pd.map_pirq(5, "msi", B, 0, 0x1000)


def test_map_and_unmap_errors(fakes):
    ctrl, _call, pd = fakes
    ctrl.err = errno.ENODATA
    with pytest.raises(OSError) as e:
        pd.map_pirq(5, "msix", B, 0, 0x1000)
    assert e.value.errno == errno.ENODATA
    ctrl.err = errno.ESRCH
    with pytest.raises(OSError) as e:
        pd.unmap_pirq(5, 55)
    assert e.value.errno == errno.ESRCH
    assert ctrl.calls[-1] == ("unmap", 5, 55)


def test_handles_opened_once_per_process_and_closed(fakes):
    ctrl, call, pd = fakes
    pd.unmap_pirq(1, 2)
    pd.unmap_pirq(1, 3)
    pd.prepare_msix(B)
    assert ctrl.opened == 1
    pd.close()
    assert (ctrl.closed, call.freed, call.closed) == (1, 1, 1)


def _config(tmp_path, data: bytes):
    d = tmp_path / "sys/bus/pci/devices" / str(B)
    d.mkdir(parents=True)
    (d / "config").write_bytes(data)
    return d / "config"


def test_config_reads_and_exact_2_byte_writes(tmp_path):
    cfg = _config(tmp_path, bytes(range(256)))
    pd = RealPhysdev(lambda kind: pytest.fail("no library for config access"), root=tmp_path)
    assert pd.read_config(B, 4, 2) == 0x0504
    assert pd.read_config(B, 0x40, 4) == 0x43424140
    pd.write_config(B, 0x42, 2, 0xC0DE)
    assert cfg.read_bytes()[0x40:0x45] == bytes([0x40, 0x41, 0xDE, 0xC0, 0x44])
    for offset, size, value in ((0x41, 2, 0), (0x40, 4, 0), (0x40, 1, 0), (0x42, 2, 0x10000), (4095, 2, 0)):
        with pytest.raises(PlatformError):
            pd.write_config(B, offset, size, value)
    with pytest.raises(PlatformError):
        pd.read_config(B, 3, 2)


def test_real_platform_gives_the_real_physdev():
    assert isinstance(xen.RealPlatform().physdev(), RealPhysdev)
    assert "xencall2" in xen._LIBS["call"][2]
