"""Lane probe (stdlib only, dom0): does Xen drop dom0's wrong-width writes to an MSI-X capability?

    msiprobe.py BDF      prints one line: key=value ...

Run while a guest has MSI-X enabled on the function (its PIRQs mapped).  It
tries a 4-byte write of the capability's first dword and a 1-byte write of the
control word's high byte, each setting MASKALL, and reads back after each; a
2-byte write then puts the control word back as it was (the only width Xen's
intercept lets through).
"""

from __future__ import annotations

import os
import sys

MSIX, MASKALL = 0x11, 0x4000


def main(bdf: str) -> int:
    fd = os.open(f"/sys/bus/pci/devices/{bdf}/config", os.O_RDWR)
    rd = lambda off, n: int.from_bytes(os.pread(fd, n, off), "little")    # noqa: E731
    pos, seen = rd(0x34, 1) & 0xFC, set()
    while pos and pos not in seen and rd(pos, 1) != MSIX:
        seen.add(pos)
        pos = rd(pos + 1, 1) & 0xFC
    if not pos or rd(pos, 1) != MSIX:
        print("msix=none")
        return 0
    ctrl = rd(pos + 2, 2)
    out = [f"cap={pos:#x}", f"ctrl={ctrl:#06x}"]
    dword = rd(pos, 4)
    n4 = os.pwrite(fd, (dword | MASKALL << 16).to_bytes(4, "little"), pos)
    out += [f"write4_ret={n4}", f"after_write4={rd(pos + 2, 2):#06x}"]
    n1 = os.pwrite(fd, bytes([(ctrl | MASKALL) >> 8]), pos + 3)
    out += [f"write1_ret={n1}", f"after_write1={rd(pos + 2, 2):#06x}"]
    n2 = os.pwrite(fd, ctrl.to_bytes(2, "little"), pos + 2)
    out += [f"restore2_ret={n2}", f"after_restore={rd(pos + 2, 2):#06x}"]
    print(" ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
