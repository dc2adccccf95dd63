"""Policy as data: TOML parsing, matching, reload, quirks and capability hiding."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcibackd.confspace import DevicePolicy, PolicyError, PolicyStore, Quirk
from pcibackd.confspace.policy import parse_policy
from simdom0.lspci import lspci_vvv
from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.port import DeviceInfo

SAMPLE = Path(__file__).resolve().parents[3] / "etc" / "pcibackd-policy.toml"


def _info(vendor=0x8086, device=0x10D3, sv=0x8086, sd=0x0000, bdf="0000:00:02.0"):
    return DeviceInfo(BDF.parse(bdf), vendor, device, 0x020000, sv, sd, 0, 11, 4096)


def test_sample_file_loads():
    store = PolicyStore(SAMPLE)
    pol = store.for_device(_info())
    assert pol.quirks == (Quirk(0xE8, 2, 0x000F),)
    assert not pol.permissive
    other = store.for_device(_info(0x1AF4, 0x1041, bdf="0000:03:00.0"))
    assert other.hidden_ext_caps == frozenset({0x0001})


def test_precedence_and_accumulation():
    pf = parse_policy('''
permissive = true
[device."8086:10d3"]
permissive = false
hide_capabilities = ["msix"]
quirks = [{offset = 0x40, size = 4, mask = 0xff}]
[device."8086:10d3:8086:0000"]
hide_capabilities = [5]
[device."00:02.0"]
permissive = true
quirks = [{offset = 0x40, size = 1, mask = 0x1}]
''')
    pol = pf.for_device(_info())
    assert pol.permissive is True                      # BDF beats id
    assert pol.hidden_caps == frozenset({0x11, 0x05})
    assert pol.quirks[0] == Quirk(0x40, 1, 0x1)        # most specific first
    assert pol.matched == ("8086:10d3", "8086:10d3:8086:0000", "00:02.0")
    assert pf.for_device(_info(bdf="0000:00:03.0")).permissive is False
    assert pf.for_device(_info(sd=0x1234, bdf="0000:00:03.0")).hidden_caps == frozenset({0x11})
    assert pf.for_device(_info(vendor=0x1AF4)).permissive is True   # global


@pytest.mark.parametrize("text", [
    "permissive = 1",
    "colour = 'red'",
    '[device."8086"]',
    '[device."8086:10d3:1"]',
    '[device."zz:00.0"]',
    '[device."8086:10d3"]\npermissive = "yes"',
    '[device."8086:10d3"]\nhide_capabilities = ["bogus"]',
    '[device."8086:10d3"]\nhide_capabilities = [256]',
    '[device."8086:10d3"]\nhide = ["msi"]',
    '[device."8086:10d3"]\nquirks = [{offset = 0x41, size = 2, mask = 1}]',
    '[device."8086:10d3"]\nquirks = [{offset = 0x40, size = 3, mask = 1}]',
    '[device."8086:10d3"]\nquirks = [{offset = 0x1000, size = 4, mask = 1}]',
    '[device."8086:10d3"]\nquirks = [{offset = 0x40, size = 1, mask = 0x100}]',
    '[device."8086:10d3"]\nquirks = [{offset = 0x40, size = 1}]',
    "not toml [",
])
def test_malformed_policy_rejected(text):
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_reload_returns_new_policies_and_keeps_old_on_error(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("permissive = false\n")
    store = PolicyStore(path)
    info = _info()
    assert store.for_device(info).permissive is False
    path.write_text('[device."8086:10d3"]\npermissive = true\n')
    assert store.reload() == {info.bdf: DevicePolicy(permissive=True)}
    path.write_text("garbage [")
    with pytest.raises(PolicyError):
        store.reload()
    assert store.for_device(info).permissive is True
    store.forget(info.bdf)
    path.write_text("")
    assert store.reload() == {}


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(PolicyError):
        PolicyStore(tmp_path / "absent.toml")
    assert PolicyStore().for_device(_info()) == DevicePolicy()


# -- quirks ----------------------------------------------------------------------------

def test_quirk_makes_masked_bits_writable(rig):
    r = rig("e1000e", DevicePolicy(quirks=(Quirk(0xE8, 2, 0x000F),)))   # PCIe DevCtl
    before = r.hw(0xE8, 2)
    r.write(0xE8, 2, before ^ 0x00FF)
    assert r.hw(0xE8, 2) == before ^ 0x000F
    assert r.cs.denied_writes == 1                     # bits 4-7 were dropped


def test_quirk_cannot_override_a_handled_register(rig):
    r = rig("e1000e", DevicePolicy(quirks=(Quirk(0x10, 4, 0xFFFFFFFF),)))
    r.write(0x10, 4, 0x12345678)
    assert r.log() == []


def test_quirk_removed_with_policy(rig):
    r = rig("e1000e", DevicePolicy(quirks=(Quirk(0xE8, 2, 0x000F),)))
    r.cs.set_policy(DevicePolicy())
    before = r.hw(0xE8, 2)
    r.write(0xE8, 2, before ^ 0x000F)
    assert r.hw(0xE8, 2) == before


# -- capability hiding --------------------------------------------------------------------

def test_hiding_relinks_the_legacy_list(rig):
    r = rig("e1000e", DevicePolicy(hidden_caps=frozenset({0x05, 0x11})))
    text = lspci_vvv(r.cs.guest_config_dump(), "00:02.0")
    assert "MSI:" not in text and "MSI-X" not in text
    assert "Power Management" in text and "Express" in text
    assert r.read(0xC8, 2) == 0xE001                   # PM -> PCIe
    assert r.read(0xE0, 2) & 0xFF00 == 0               # PCIe was followed by MSI-X: now the end
    assert r.read(0xD0, 4) == 0 and r.read(0xA0, 4) == 0   # hidden bodies read 0


def test_hiding_the_first_capability_moves_the_pointer(rig):
    r = rig("e1000e", DevicePolicy(hidden_caps=frozenset({0x01})))
    assert r.read(0x34, 1) == 0xD0


def test_hiding_every_capability_clears_cap_list(rig):
    r = rig("edu", DevicePolicy(hidden_caps=frozenset({0x05})))
    assert r.read(0x34, 1) == 0
    assert not r.read(0x06, 2) & 0x10
    assert "Capabilities" not in lspci_vvv(r.cs.guest_config_dump())


def test_hiding_extended_capabilities(rig):
    r = rig("e1000e", DevicePolicy(hidden_ext_caps=frozenset({0x0001})))   # AER at 0x100
    head = r.read(0x100, 4)
    assert head & 0xFFFF == 0 and head >> 20 == 0x140  # null entry linking to DSN
    text = lspci_vvv(r.cs.guest_config_dump(), "00:02.0")
    assert "Advanced Error Reporting" not in text and "Device Serial Number" in text
    r2 = rig("pcie-root-port", DevicePolicy(hidden_ext_caps=frozenset({0x000D})))  # ACS at 0x148
    assert r2.read(0x100, 4) >> 20 == 0
    assert r2.read(0x148, 4) == 0
