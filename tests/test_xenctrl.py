"""What the toolstack grants a guest for a function, read from a sysfs tree."""

from pcibackd.pcihost.bdf import BDF
from pcibackd.xen.xenctrl import grants_for

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


def test_sbdf_is_libxl_encoding():
    from pcibackd.xen.xenctrl import sbdf
    assert sbdf(BDF.parse("0001:02:1f.7")) == 0x1 << 16 | 0x02 << 8 | 0x1F << 3 | 7
    assert sbdf(B) == 0x28


def test_iommu_assignment_outside_xen_is_a_clear_error():
    import os

    import pytest

    from pcibackd.xen import xenctrl
    from pcibackd.xen.platform import PlatformError
    if os.path.exists("/dev/xen/privcmd"):
        pytest.skip("a real Xen domain: assignment would act")
    try:
        xenctrl.load_library("ctrl")
    except PlatformError:
        pytest.skip("libxenctrl not installed")
    for call in (lambda: xenctrl.assign_device(xenctrl.DOMID_IO, B), lambda: xenctrl.deassign_device(3, B)):
        with pytest.raises(PlatformError, match="xc_interface_open failed"):
            call()
