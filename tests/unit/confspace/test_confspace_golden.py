"""Golden tests: each dump's guest view, decoded by ``lspci -F``, against the host's lspci -vvv.

The host files were captured with a live ``lspci -vvv -nn`` on the machine that
owned the device; the guest view is decoded from a config dump.  Two kinds of
differences are allowed, each listed here with its reason:

* TOOL_ONLY: what live lspci takes from sysfs rather than config space (the same
  lines differ for the *unvirtualized* dump, so they say nothing about us);
  they are normalised on both sides.
* VIRTUALIZED: fields the backend virtualizes on purpose.

A second, exact comparison runs the raw host dump and the guest view through the
same ``lspci -F``: every differing line must be a VIRTUALIZED one.
"""

from __future__ import annotations

import re
import shutil

import pytest
from confspace_support import ALL_DUMPS

from pcibackd.confspace import DevicePolicy
from simdom0.lspci import hexdump, lspci_vvv
from simdom0.dumps import list_dumps, load_dump

pytestmark = pytest.mark.skipif(shutil.which("lspci") is None, reason="pciutils not installed")

# (pattern, replacement, reason) applied to every line of both sides.
TOOL_ONLY = [
    (r"^\tKernel (driver in use|modules): .*$", None,
     "driver binding comes from sysfs, not config space"),
    (r"^\tPhysical Slot: .*$", None, "slot numbers come from sysfs /sys/bus/pci/slots"),
    (r" \[size=[^\]]+\]$", "", "BAR/ROM sizes come from sysfs resource (a dump has no sizes)"),
    (r"^\tRegion \d: Memory at <unassigned> \(32-bit, non-prefetchable\)$", None,
     "dump mode shows the upper dword of a 64-bit BAR as its own region"),
    (r"(Subsystem: ).*(\[[0-9a-f]{4}:[0-9a-f]{4}\])$", r"\1\2",
     "subsystem names are looked up differently live and from a dump; the IDs must match"),
    (r"^(\tPrefetchable memory behind bridge: )0*([0-9a-f]+)-0*([0-9a-f]+)"
     r"( \[size=[^\]]+\])? \[(32|64)-bit\]$", r"\1\2-\3",
     "live lspci takes the window width from the kernel's resource flags"),
]

# (pattern, reason): lines allowed to differ because the backend virtualizes them.
VIRTUALIZED = [
    (r"^\tInterrupt: pin [A-D] routed to IRQ \d+$",
     "interrupt line reads the host IRQ (what pcifront binds as the PIRQ); live lspci shows "
     "the same sysfs irq, so only the raw dump differs"),
    (r"^\t\tFlags: PMEClk[+-] DSI[+-] D1[+-] D2[+-] AuxCurrent=\d+mA PME\(.*\)$",
     "PME support masked on read: PMEs are shared with dom0"),
    (r"^\t\tStatus: D\d NoSoftRst[+-] PME-Enable[+-] .*$",
     "PME enable cleared at init: PMEs are shared with dom0"),
    (r"^\tCapabilities: \[[0-9a-f]+.*$", "a capability hidden by policy"),
]


# (pattern, reason): further lines allowed to differ from the raw dump of an SR-IOV VF.
VIRTUALIZED_VF = [
    (r"^\S+ .*\[[0-9a-f]{4}:[0-9a-f]{4}\]",
     "a VF's vendor/device registers read 0xffff; the guest reads the kernel's identity "
     "(Linux's xen_pcibk_read_vendor/device return dev->vendor/device)"),
    (r"^\tRegion \d: Memory at [0-9a-f]+ ",
     "a VF's BAR registers read 0; the guest reads the VF BAR the kernel assigned (bar_init "
     "takes dev->resource)"),
    (r"^\tSubsystem: .*\[[0-9a-f]{4}:[0-9a-f]{4}\]$",
     "lspci names the subsystem after the vendor/device above (the IDs are unchanged)"),
    (r"^\t\t\t AtomicOpsCap: ",
     "lspci prints this PCIe line only for a function on which it sees a memory region"),
]


def _normalise(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        for pattern, repl, _reason in TOOL_ONLY:
            if re.search(pattern, line):
                line = None if repl is None else re.sub(pattern, repl, line)
                if line is None:
                    break
        if line is not None and line.strip():
            out.append(line)
    return out


def _virtualized(line: str) -> bool:
    return any(re.search(p, line) for p, _ in VIRTUALIZED)


def _line_diff(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """Lines only in a, lines only in b (order-aware via difflib)."""
    import difflib
    only_a, only_b = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            only_a += a[i1:i2]
            only_b += b[j1:j2]
    return only_a, only_b


@pytest.mark.parametrize("dump", ALL_DUMPS)
def test_guest_view_matches_host_lspci(rig, dump):
    d = load_dump(dump)
    r = rig(dump)
    guest = lspci_vvv(r.cs.guest_config_dump(), d.bdf)
    host = (list_dumps()[dump] / "lspci-vvv.txt").read_text()
    only_host, only_guest = _line_diff(_normalise(host), _normalise(guest))
    assert [l for l in only_host + only_guest if not _virtualized(l)] == [], (only_host, only_guest)
    # The first line (class, names, IDs, revision) must be identical.
    assert guest.splitlines()[0] == host.splitlines()[0]


@pytest.mark.parametrize("dump", ALL_DUMPS)
def test_guest_view_vs_raw_dump_differs_only_where_virtualized(rig, dump):
    d = load_dump(dump)
    r = rig(dump)
    raw = lspci_vvv(d.config, d.bdf).splitlines()
    guest = lspci_vvv(r.cs.guest_config_dump(), d.bdf).splitlines()
    only_raw, only_guest = _line_diff(raw, guest)
    vf = [p for p, _ in VIRTUALIZED_VF] if d.physfn else []
    assert [l for l in only_raw + only_guest
            if not _virtualized(l) and not any(re.search(p, l) for p in vf)] == []
    if d.physfn:
        assert f"[{d.ids['vendor']:04x}:{d.ids['device']:04x}]" in guest[0]
    if d.config[0x3D] and d.config[0x3C] != d.irq & 0xFF:
        assert f"\tInterrupt: pin {'?ABCD'[d.config[0x3D]]} routed to IRQ {d.irq}" in guest


def test_hidden_capability_golden(rig):
    """With MSI-X hidden the e1000e view loses exactly that capability block."""
    r = rig("e1000e", DevicePolicy(hidden_caps=frozenset({0x11})))
    d = load_dump("e1000e")
    raw = lspci_vvv(d.config, d.bdf).splitlines()
    guest = lspci_vvv(r.cs.guest_config_dump(), d.bdf).splitlines()
    only_raw, only_guest = _line_diff(raw, guest)
    assert only_guest == []
    assert only_raw == ["\tCapabilities: [a0] MSI-X: Enable- Count=5 Masked-",
                        "\t\tVector table: BAR=3 offset=00000000",
                        "\t\tPBA: BAR=3 offset=00002000"]


def test_pme_masking_visible_in_lspci(rig, tmp_path):
    from confspace_support import custom_dump
    cfg = load_dump("e1000e").config
    pmc = int.from_bytes(cfg[0xCA:0xCC], "little") | 0xF800
    path = custom_dump(tmp_path, "e1000e", {0xCA: pmc.to_bytes(2, "little"), 0xCC: b"\x00\x01"})
    raw = lspci_vvv(load_dump(path).config, "00:02.0")
    assert "PME(D0+,D1+,D2+,D3hot+,D3cold+)" in raw and "PME-Enable+" in raw
    guest = lspci_vvv(rig(path).cs.guest_config_dump(), "00:02.0")
    assert "PME(D0-,D1-,D2-,D3hot-,D3cold-)" in guest and "PME-Enable-" in guest


def test_hexdump_format():
    text = hexdump(bytes(range(256)), "00:1f.2")
    lines = text.splitlines()
    assert lines[0].startswith("00:1f.2 ")
    assert lines[1] == "00: " + " ".join(f"{i:02x}" for i in range(16))
    assert len([line for line in lines if line]) == 17
    assert hexdump(bytes(4096)).splitlines()[-2].startswith("ff0: ")
    with pytest.raises(ValueError):
        hexdump(bytes(100))
