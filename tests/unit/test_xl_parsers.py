"""xl's PCI spec (xl-pci-configuration(5)) and config (xl.cfg(5)) syntax, parsed without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pcibackd.control.commands import COMMANDS, CommandError
from pcibackd.control.create import CreateError, plan
from pcibackd.daemon.config import DaemonConfig
from pcibackd.wire.bdf import BDF
from pcibackd.xl.cfg import CfgError, parse_config
from pcibackd.xl.pcispec import KEYS, SpecError, parse_pattern, parse_spec


def test_spec_forms():
    s = parse_spec("03:00.1@0a,permissive=1,seize=yes,name=nic0")
    assert s.bdf == BDF(0, 3, 0, 1) and s.vslot == 0xA and s.permissive and s.seize and s.name == "nic0"
    assert "permissive=1" in s.opts and s.opts.startswith("msitranslate=0,power_mgmt=0")
    assert parse_spec("bdf=0001:03:1f.7,vslot=3").bdf == BDF(1, 3, 0x1F, 7)
    assert parse_spec("0000:04:00.*").fn is None
    assert parse_spec("04:00.0,msitranslate=0,power_mgmt=0,rdm_policy=strict").bdf == BDF(0, 4, 0, 0)
    assert parse_spec("04:00.0", {"permissive": "1"}).permissive
    assert not parse_spec("04:00.0,permissive=0", {"permissive": "1"}).permissive   # the spec wins


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("zz:00.0", "not a PCI address"), ("03:20.0", "out of range"), ("03:00.8", "not a PCI"),
    ("03:00.0@20", "out of range"), ("03:00.0,colour=red", "unknown key"), ("03:00.0,permissive=maybe", "0 or 1"),
    ("03:00.0,msitranslate=1", "HVM-only"), ("03:00.0,power_mgmt=1", "HVM-only"),
    ("03:00.0,rdm_policy=relaxed", "HVM-only"), ("03:00.0,name=a b", "letters"), ("permissive=1", "names no"),
    ("03:00.0,04:00.0", "KEY=VALUE"), ("x" * 300, "longer"),
])
def test_spec_errors_say_what(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_keys_table_says_which_act_for_pv():
    assert {k for k, (pv, _, _) in KEYS.items() if not pv} == {"msitranslate", "power_mgmt", "rdm_policy"}


def test_pattern_is_an_address_or_a_slot_wildcard():
    p = parse_pattern("0000:04:00.*")
    assert p.matches(BDF(0, 4, 0, 3)) and not p.matches(BDF(0, 4, 1, 0))
    with pytest.raises(SpecError):
        parse_pattern("04:00.0,seize=1")


@given(st.text(max_size=80))
def test_spec_parser_raises_only_spec_errors(text):
    try:
        parse_spec(text)
    except SpecError:
        pass


CFG = '''# comment
name = "g1"   # trailing comment
memory = 512; vcpus=2
extra = 'console=hvc0 \\"x\\"'
disk = [ 'phy:/dev/vg/g1,xvda,w',
         # a comment inside a list
         'file:/x.img,xvdb,r', ]
pci = [ "03:00.0@05",
        "0000:04:00.1,permissive=1" ]
pci_seize = 1
cpus = [ [1, 2], [3] ]
on_crash += "x"
'''


def test_config_values_and_lines():
    c = parse_config(CFG, "g1.cfg")
    assert c.get("name") == "g1" and c.get("memory") == "512" and c.get("vcpus") == "2"
    assert c.get("extra") == 'console=hvc0 "x"'
    assert c.get("disk") == ["phy:/dev/vg/g1,xvda,w", "file:/x.img,xvdb,r"]
    assert c.get("cpus") == [["1", "2"], ["3"]]
    assert c.line_of("pci") == 8
    specs = c.pci_specs()
    assert [str(s.bdf) for s in specs] == ["0000:03:00.0", "0000:04:00.1"]
    assert all(s.seize for s in specs) and specs[1].permissive and specs[0].vslot == 5


def test_config_without_pci_keeps_everything_else_at_its_line():
    c = parse_config(CFG, "g1.cfg")
    text = c.without("pci")
    assert "pci =" not in text and "03:00.0" not in text
    assert text.count("\n") == CFG.count("\n")
    again = parse_config(text)
    assert again.line_of("pci_seize") == c.line_of("pci_seize") and again.get("pci") is None
    assert again.get("disk") == c.get("disk")


def test_config_append():
    assert parse_config("pci = ['01:00.0']\npci += ['02:00.0']\n").get("pci") == ["01:00.0", "02:00.0"]


@pytest.mark.parametrize("text, line, message", [
    ('name = "g1"\nmemory 512\n', 2, "expected '='"),
    ('name = "g1\n', 1, "newline inside a string"),
    ('a = 1\npci = [ "01:00.0"\n\n', 2, "not closed"),
    ('a = 1\n\nb = [1 2]\n', 3, "expected ','"),
    ('a = 1 2\n', 1, "unexpected"),
    ('= 3\n', 1, "setting name"),
    ('a = \n', 1, "expected a value"),
    ('a = "\\q"\n', 1, "unknown escape"),
    ('x = 1\npci = [ "03:00.0,rdm_policy=relaxed" ]\n', 2, "HVM-only"),
    ('x = 1\n\npci = "03:00.0"\n', 3, "list of strings"),
])
def test_config_errors_name_the_line(text, line, message):
    with pytest.raises(CfgError, match=message) as exc:
        parse_config(text, "bad.cfg").pci_specs()
    assert exc.value.line == line and str(exc.value).startswith(f"bad.cfg:{line}:")


@given(st.text(max_size=200))
def test_config_parser_raises_only_cfg_errors(text):
    try:
        parse_config(text).pci_specs()
    except CfgError:
        pass


def test_daemon_config_devices_section(tmp_path):

    p = tmp_path / "pcibackd.toml"
    p.write_text('[pcibackd]\nstate_dir = "/x"\n[devices]\nhide = ["0000:03:00.0", "04:00.*"]\n')
    c = DaemonConfig.load(p)
    assert c.hide == ("0000:03:00.0", "04:00.*") and c.state_dir == "/x"
    for bad in ('hide = "03:00.0"', 'hide = ["03:00.0,seize=1"]', 'hide = ["zz"]', 'other = 1'):
        p.write_text(f"[devices]\n{bad}\n")
        with pytest.raises(ValueError, match=r"\[devices\]"):
            DaemonConfig.load(p)


def test_create_plan_takes_pci_out_and_keeps_an_iommu_context(tmp_path):
    cfg = tmp_path / "g.cfg"
    cfg.write_text(CFG)
    name, text, specs = plan(str(cfg), ["-q"])
    assert name == "g1" and specs == ["0000:03:00.0@05,seize=1", "0000:04:00.1,permissive=1,seize=1"]
    again = parse_config(text)
    assert again.get("pci") is None and again.get("passthrough") == "enabled"
    assert again.line_of("pci_seize") == parse_config(CFG).line_of("pci_seize")
    cfg.write_text(CFG + 'passthrough = "sync_pt"\n')
    assert parse_config(plan(str(cfg), [])[1]).get("passthrough") == "sync_pt"     # the admin's choice stays
    for opts, message in ((["-c"], "console"), (["pci=['01:00.0']"], "config file")):
        with pytest.raises(CreateError, match=message):
            plan(str(cfg), opts)
    cfg.write_text('name = "h"\ntype = "hvm"\npci = ["01:00.0"]\n')
    with pytest.raises(CreateError, match=":2: type 'hvm'"):
        plan(str(cfg), [])


def test_lifecycle_commands_take_options_with_defaults():
    add = COMMANDS["assignable-add"]
    assert add.check({"bdf": "03:00.0"}) == {"bdf": "03:00.0", "name": "", "force": False}
    assert add.check({"bdf": "03:00.0", "force": True})["force"] is True
    for bad in ({"bdf": "03:00.0", "force": 1}, {"name": "x"}, {"bdf": "03:00.0", "rebind": True}):
        with pytest.raises(CommandError):
            add.check(bad)
