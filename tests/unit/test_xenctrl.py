"""What the toolstack grants a guest for a function, read from a sysfs tree."""

from pcibackd.wire.bdf import BDF
from pcibackd.platform.xenctrl import grants_for

B = BDF.parse("0000:00:05.0")


def test_grants_from_resource_and_irq(tmp_path):
    dev = tmp_path / "sys/bus/pci/devices" / str(B)
    dev.mkdir(parents=True)
    lines = ["0x00000000fea00000 0x00000000feafffff 0x0000000000040200",     # 1 MiB memory BAR
             "0x000000000000c000 0x000000000000c01f 0x0000000000040101",     # 32 I/O ports
             "0x0000000000000000 0x0000000000000000 0x0000000000000000"] + \
        ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 3 + \
        ["0x00000000feb00000 0x00000000feb3ffff 0x0000000000046200"]         # ROM
    (dev / "resource").write_text("\n".join(lines) + "\n")
    (dev / "irq").write_text("21\n")
    assert grants_for(B, tmp_path) == [("iomem", 0xFEA00, 256), ("ioport", 0xC000, 32),
                                       ("iomem", 0xFEB00, 64), ("irq", 21, 0)]
    (dev / "irq").write_text("0\n")
    assert ("irq", 0, 0) not in grants_for(B, tmp_path)


def test_unassigned_or_undecoded_resources_are_never_granted(tmp_path):
    dev = tmp_path / "sys/bus/pci/devices" / str(B)
    dev.mkdir(parents=True)
    lines = ["0x0000000000000000 0x0000000000000fff 0x0000000020040200",     # unset: start 0, size 4 KiB
             "0x00000000fea00000 0x00000000fea00fff 0x0000000010040200",     # disabled
             "0x00000000feb00000 0x00000000feb00fff 0x0000000020040200",     # unset, stale address
             "0x0000000000000000 0x000000000000001f 0x0000000000040101"] +         ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 3
    (dev / "resource").write_text("\n".join(lines) + "\n")
    (dev / "irq").write_text("0\n")
    assert grants_for(B, tmp_path) == []


def test_sbdf_is_libxl_encoding():
    from pcibackd.platform.xenctrl import sbdf
    assert sbdf(BDF.parse("0001:02:1f.7")) == 0x1 << 16 | 0x02 << 8 | 0x1F << 3 | 7
    assert sbdf(B) == 0x28


def test_iommu_assignment_outside_xen_is_a_clear_error():
    import os

    import pytest

    from pcibackd.platform import xenctrl
    from pcibackd.platform.api import PlatformError
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("a real Xen domain: assignment would act")
    try:
        xenctrl.load_library("ctrl")
    except PlatformError:
        pytest.skip("libxenctrl not installed")
    for call in (lambda: xenctrl.assign_device(xenctrl.DOMID_IO, B), lambda: xenctrl.deassign_device(3, B)):
        with pytest.raises(PlatformError, match="xc_interface_open failed"):
            call()


class _FakeXc:
    """libxenctrl stand-in: every assign/deassign fails with ``err`` (errno set like the C library)."""

    def __init__(self, err):
        self.err, self.calls = err, []

    def xc_interface_open(self, *a):
        return 1

    def xc_interface_close(self, xch):
        return 0

    def _fail(self, name, *args):
        import ctypes
        self.calls.append((name, args[1:]))
        ctypes.set_errno(self.err)
        return -1

    def xc_assign_device(self, *args):
        return self._fail("assign", *args)

    def xc_deassign_device(self, *args):
        return self._fail("deassign", *args)


def test_errno_mapping_of_assignment(monkeypatch):
    import errno

    import pytest

    from pcibackd.platform import xenctrl
    from pcibackd.platform.api import PlatformError
    for err in (errno.EOPNOTSUPP, errno.ENXIO, errno.ENOSYS):        # no IOMMU context
        fake = _FakeXc(err)
        monkeypatch.setattr(xenctrl, "load_library", lambda kind, fake=fake: fake)
        assert "not quarantined" in xenctrl.assign_device(xenctrl.DOMID_IO, B)
        with pytest.raises(PlatformError, match="passthrough") as exc:
            xenctrl.assign_device(5, B)                               # a guest's DMA must be confined
        assert exc.value.errno == err
        assert "was not assigned" in xenctrl.deassign_device(5, B)
        assert fake.calls[0] == ("assign", (xenctrl.DOMID_IO, 0x28, xenctrl.XEN_DOMCTL_DEV_RDM_RELAXED))
        assert fake.calls[1] == ("assign", (5, 0x28, 0))
    fake = _FakeXc(errno.EBUSY)                                       # another guest has it
    monkeypatch.setattr(xenctrl, "load_library", lambda kind: fake)
    with pytest.raises(PlatformError) as exc:
        xenctrl.assign_device(5, B)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(PlatformError):
        xenctrl.deassign_device(5, B)
    fake.err = errno.ENODEV                                           # not there: nothing to undo
    assert "was not assigned" in xenctrl.deassign_device(5, B)
