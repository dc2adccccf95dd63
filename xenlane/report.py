"""Xen lane report (stdlib only): per device, the domU's view through pcibackd
and its differences from the view through Linux xen-pciback, with a reason each.

    report.py OUTDIR DEVICE...     exit 0 when every check passed and every
                                   difference has a reason in REASONS

Config-space bytes are compared per register (header fields by name,
capabilities by the capability list the kernel view shows); the decoded
``lspci -vvv`` lines are compared as text.  A difference is explained when a
REASONS entry matches it; an unexplained one fails the lane.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

VIDS = {"edu": "1234:11e8", "pci-testdev": "1b36:0005", "e1000e": "8086:10d3", "nvme": "1b36:0010",
        "rtl8139": "10ec:8139"}

HEADER = [  # (offset, size, name) of a type 0 header
    (0x00, 2, "VENDOR_ID"), (0x02, 2, "DEVICE_ID"), (0x04, 2, "COMMAND"), (0x06, 2, "STATUS"),
    (0x08, 1, "REVISION"), (0x09, 3, "CLASS"), (0x0C, 1, "CACHE_LINE_SIZE"), (0x0D, 1, "LATENCY_TIMER"),
    (0x0E, 1, "HEADER_TYPE"), (0x0F, 1, "BIST"),
    *[(0x10 + 4 * i, 4, f"BAR{i}") for i in range(6)],
    (0x28, 4, "CARDBUS_CIS"), (0x2C, 2, "SUBSYSTEM_VENDOR_ID"), (0x2E, 2, "SUBSYSTEM_ID"),
    (0x30, 4, "ROM_ADDRESS"), (0x34, 1, "CAPABILITY_LIST"), (0x35, 7, "RESERVED"),
    (0x3C, 1, "INTERRUPT_LINE"), (0x3D, 1, "INTERRUPT_PIN"), (0x3E, 1, "MIN_GNT"), (0x3F, 1, "MAX_LAT"),
]
CAP_NAMES = {0x01: "PM", 0x03: "VPD", 0x05: "MSI", 0x09: "VNDR", 0x10: "EXP", 0x11: "MSIX", 0x12: "SATA", 0x13: "AF"}

# Differences that are virtualized on purpose: (kind, pattern, reason).  kind
# "reg" matches a register name (e.g. "COMMAND", "CAP_MSI+0x2"), kind "line" a
# decoded lspci line from either side.
_STALE_MSI = ("the MSI address/data Xen wrote for the kernel-mode guest's MSI (that scenario runs "
              "first); the pcibackd guest reads what the function still holds")
REASONS: list[tuple[str, str, str]] = [
    ("reg", r"^CAP_MSI\+0x([4-9a-f]|1[0-3])$", _STALE_MSI),
    ("line", r"^\s+Address: [0-9a-f]+  Data: [0-9a-f]{4}$", _STALE_MSI),
]

# checks of the guest driver's use of the device (interrupts, data, pings)
DRIVER_CHECK = re.compile(r"^(nvme-|net-)")

RESULT_RE = re.compile(r"^(\S+) (\S+) (\S+) (PASS|FAIL|INFO) ?(.*)$")


def parse_lspci(text: str) -> tuple[list[str], dict[int, int]]:
    """Split a ``lspci -vvv -xxx`` dump into decoded lines and config bytes."""
    lines, cfg = [], {}
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]{2,3}): ((?:[0-9a-f]{2} ?){1,16})$", line.strip())
        if m:
            base = int(m.group(1), 16)
            for i, byte in enumerate(m.group(2).split()):
                cfg[base + i] = int(byte, 16)
        elif line.startswith(("LANE-DOMU-DEV", "LANE-DOMU-DEV-END")) or not line.strip():
            continue
        else:
            lines.append(line.rstrip())
    return lines, cfg


def register_map(cfg: dict[int, int]) -> dict[int, str]:
    """offset -> register name (header table plus the capability list)."""
    names = {}
    for off, size, name in HEADER:
        for k in range(size):
            names[off + k] = name if size == 1 or k == 0 else f"{name}+{k:#x}"
    pos, seen = cfg.get(0x34, 0) & 0xFC, set()
    while pos and pos not in seen and pos + 1 in cfg:
        seen.add(pos)
        cap = CAP_NAMES.get(cfg[pos], f"{cfg[pos]:#04x}")
        nxt = cfg[pos + 1] & 0xFC
        end = nxt if nxt > pos else min(pos + 0x40, 0x100)
        for k in range(end - pos):
            names.setdefault(pos + k, f"CAP_{cap}+{k:#x}")
        pos = nxt
    return names


def reason_for(kind: str, subject: str) -> str | None:
    for k, pattern, reason in REASONS:
        if k == kind and re.search(pattern, subject):
            return reason
    return None


def register_diffs(kcfg: dict[int, int], pcfg: dict[int, int]) -> list[tuple[str, str, str]]:
    """(register, 'kernel -> pcibackd' bytes, reason or '') per differing register."""
    names = register_map(kcfg)
    groups: dict[str, list[int]] = {}
    for off in sorted(set(kcfg) | set(pcfg)):
        if kcfg.get(off) != pcfg.get(off):
            reg = names.get(off, f"{off:#04x}")
            groups.setdefault(re.sub(r"\+0x[0-9a-f]+$", "", reg) if not reg.startswith("CAP_") else reg, []).append(off)
    out = []
    for reg, offs in groups.items():
        fmt = lambda cfg: " ".join(f"{cfg[o]:02x}" if o in cfg else "--" for o in offs)  # noqa: E731
        out.append((f"{reg}@{offs[0]:#04x}", f"{fmt(kcfg)} -> {fmt(pcfg)}", reason_for("reg", reg) or ""))
    return out


def line_diffs(klines: list[str], plines: list[str]) -> list[tuple[str, str]]:
    """('-kernel line' / '+pcibackd line', reason or '') for the decoded text."""
    out = []
    for d in difflib.unified_diff(klines, plines, lineterm="", n=0):
        if d.startswith(("---", "+++", "@@")):
            continue
        out.append((d, reason_for("line", d[1:]) or ""))
    return out


# the guest's timing figures (check "guest-timing", key=value details): key, label, unit divisor
TIMING = [("enum_us", "enumeration of the function (remove + rescan)", 1000.0, "ms"),
          ("rescan_us", "rescan of the bus, nothing new", 1000.0, "ms"),
          ("total_us", "config reads, total", 1000.0, "ms"),
          ("per_read_us", "one config read", 1.0, "us")]


def timing_table(results: list[tuple[str, ...]]) -> list[str]:
    """Per device: each timing figure in both modes and the pcibackd/kernel ratio."""
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for dev, mode, check, verdict, detail in results:
        if check != "guest-timing" or verdict == "FAIL":
            continue
        values = {}
        for word in detail.split():
            key, _, value = word.partition("=")
            try:
                values[key] = float(value)
            except ValueError:
                continue
        figures.setdefault(dev, {})[mode] = values
    out = []
    for dev, modes in figures.items():
        reads = ", ".join(f"{mode} {int(v.get('reads', 0))} ({int(v.get('changed', 0))} not the register's value)"
                          for mode, v in modes.items())
        out.append(f"  {dev} (config reads of one register: {reads}):")
        for key, label, div, unit in TIMING:
            k, p = modes.get("kernel", {}).get(key), modes.get("pcibackd", {}).get(key)
            show = lambda v: f"{v / div:10.1f} {unit}" if v is not None else f"{'-':>10} {unit}"  # noqa: E731
            ratio = f"{p / k:6.2f}x" if k and p is not None else "     -"
            out.append(f"    {label:<48} kernel {show(k)}  pcibackd {show(p)}  ratio {ratio}")
    return out


def main(argv: list[str]) -> int:
    outdir, devices = Path(argv[0]), argv[1:]
    ok = True
    results = []
    if (outdir / "results.txt").exists():
        for line in (outdir / "results.txt").read_text().splitlines():
            m = RESULT_RE.match(line)
            if m:
                results.append(m.groups())
    for dev in devices:
        views = {}
        for mode in ("kernel", "pcibackd"):
            f = outdir / f"{dev}.{mode}.lspci"
            text = f.read_text(errors="replace") if f.exists() else ""
            views[mode] = text if VIDS[dev] in text else ""
        print(f"\n===== {dev} ({VIDS[dev]}): domU view through pcibackd =====")
        shown = "\n".join(l for l in views["pcibackd"].splitlines() if not l.startswith("LANE-DOMU-DEV"))
        print(shown.rstrip() or "(none: the domU saw no such device through pcibackd)")
        print(f"----- {dev}: differences kernel xen-pciback -> pcibackd -----")
        if not views["kernel"] or not views["pcibackd"]:
            missing = [m for m, v in views.items() if not v]
            print(f"(cannot compare: no domU view in mode {', '.join(missing)})")
            ok = False
            continue
        dom0 = outdir / f"{dev}.dom0.lspci"
        if dom0.exists():
            _, dcfg = parse_lspci(dom0.read_text(errors="replace"))
            _, kcfg0 = parse_lspci(views["kernel"])
            for reg, change, _ in register_diffs(dcfg, kcfg0):
                print(f"  (info) xen-pciback virtualizes {reg}: dom0 -> domU {change}")
        klines, kcfg = parse_lspci(views["kernel"])
        plines, pcfg = parse_lspci(views["pcibackd"])
        regs, lines = register_diffs(kcfg, pcfg), line_diffs(klines, plines)
        for reg, change, reason in regs:
            print(f"  config {reg:<24} {change:<30} {reason or 'UNEXPLAINED'}")
            ok &= bool(reason)
        for d, reason in lines:
            print(f"  lspci  {d}\n         -> {reason or 'UNEXPLAINED'}")
            ok &= bool(reason)
        if not regs and not lines:
            print("  none: identical")
    timing = timing_table(results)
    if timing:
        print("\n===== what the guest feels: pcibackd / kernel xen-pciback =====")
        print("\n".join(timing))
    print("\n===== checks =====")
    kernel_failed = {(dev, check) for dev, mode, check, verdict, _ in results if mode == "kernel" and verdict == "FAIL"}
    for dev, mode, check, verdict, detail in results:
        note = ""
        if verdict == "FAIL" and DRIVER_CHECK.match(check):
            # the guest driver's outcome is pcibackd's to match, not to beat
            if mode == "kernel":
                note = "(reference backend; not counted) "
            elif (dev, check) in kernel_failed:
                note = "(xen-pciback fails it too; not counted) "
        print(f"  {verdict:<5} {dev:<12} {mode:<9} {check:<24} {note}{detail}")
        ok &= verdict != "FAIL" or bool(note)
    if not results:
        print("  (no results: dom0 did not run the scenarios)")
        ok = False
    print(f"\nXEN LANE: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
