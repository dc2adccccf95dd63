"""The Xen lane's report (xenlane/report.py): the guest timing table and the
register comparison it fails the lane on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "lane_report", Path(__file__).resolve().parents[2] / "xenlane" / "report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def test_timing_table_gives_the_pcibackd_over_kernel_ratio():
    results = [
        ("edu", "kernel", "guest-timing", "INFO",
         "dev=0000:00:00.0 rescan_us=2000 enum_us=10000 reads=10000 total_us=1000000 per_read_us=100.0"),
        ("edu", "pcibackd", "guest-timing", "INFO",
         "dev=0000:00:00.0 rescan_us=5000 enum_us=40000 reads=10000 total_us=3000000 per_read_us=300.0"),
        ("edu", "pcibackd", "attach", "PASS", "domid 3"),
    ]
    lines = report.timing_table(results)
    assert lines[0].strip() == ("edu (config reads of one register: kernel 10000 (0 not the register's value), "
                                "pcibackd 10000 (0 not the register's value)):")
    per_read = next(l for l in lines if "one config read" in l)
    assert "100.0 us" in per_read and "300.0 us" in per_read and "3.00x" in per_read
    enum = next(l for l in lines if "enumeration" in l)
    assert "10.0 ms" in enum and "40.0 ms" in enum and "4.00x" in enum


def test_timing_table_without_a_kernel_figure_shows_no_ratio():
    results = [("edu", "pcibackd", "guest-timing", "INFO", "reads=10 per_read_us=3.0"),
               ("edu", "kernel", "guest-timing", "FAIL", "reads=0")]
    per_read = next(l for l in report.timing_table(results) if "one config read" in l)
    assert "ratio      -" in per_read


def test_a_differing_command_register_is_unexplained():
    kcfg = {0x04: 0x03, 0x05: 0x01}
    pcfg = {0x04: 0x07, 0x05: 0x01}
    (reg, change, reason), = report.register_diffs(kcfg, pcfg)
    assert reg == "COMMAND@0x04" and change == "03 -> 07" and reason == ""
