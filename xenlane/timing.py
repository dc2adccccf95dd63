"""Where the Xen lane's time went (stdlib only): host setup, QEMU boot, then
each phase dom0 marked in ``timing.txt``, printed as one table.

    timing.py OUTDIR HOST_SETUP_S BOOT_S QEMU_S

``timing.txt`` (written by dom0-main.sh) holds ``<dom0 uptime> <phase>`` lines,
each the start of a phase; a phase ends where the next begins and the last
one, ``end``, marks the reboot.  BOOT_S is measured on the host (QEMU start to
"dom0 services up" in the serial log, to the second), QEMU_S is QEMU's whole
run; what QEMU spent after dom0's ``end`` (and the boot's rounding) shows as
"reboot and rest".
"""

from __future__ import annotations

import sys
from pathlib import Path


def phases(text: str) -> list[tuple[str, float]]:
    """(phase, seconds) from ``<uptime> <phase>`` lines; the ``end`` mark closes the last."""
    marks = []
    for line in text.splitlines():
        stamp, _, name = line.strip().partition(" ")
        try:
            marks.append((float(stamp), name.strip() or "?"))
        except ValueError:
            continue
    return [(name, nxt - t) for (t, name), (nxt, _) in zip(marks, marks[1:])]


def table(host_setup: float, boot: float, qemu: float, dom0: list[tuple[str, float]]) -> list[str]:
    rows = [("host setup (packages, images)", host_setup), ("QEMU: Xen + dom0 boot", boot), *dom0]
    rows.append(("QEMU: reboot and rest", qemu - boot - sum(s for _, s in dom0)))
    width = max(len(name) for name, _ in rows)
    out = [f"  {name:<{width}} {seconds:6.0f}s" for name, seconds in rows]
    out.append(f"  {'total':<{width}} {host_setup + qemu:6.0f}s")
    return out


def main(argv: list[str]) -> int:
    outdir, host_setup, boot, qemu = Path(argv[0]), *(float(a) for a in argv[1:4])
    f = outdir / "timing.txt"
    dom0 = phases(f.read_text(errors="replace")) if f.exists() else []
    print("\n===== lane time per phase (scenario = device/mode) =====")
    if not dom0:
        print("  (dom0 marked no phases: it did not get past its services)")
    print("\n".join(table(host_setup, boot, qemu, dom0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
