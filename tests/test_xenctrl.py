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
