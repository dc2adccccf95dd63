"""Per-guest emulated state: snapshot/restore, on_change, policy replacement."""

from __future__ import annotations

import json

import pytest

from pcibackd.confspace import ConfSpace, DevicePolicy
from pcibackd.wire.pciregs import (COMMAND_INTX_DISABLE as INTX_DISABLE, COMMAND_MEM as MEM,
                                        COMMAND_SERR as SERR)


def _guest_activity(r):
    r.write(4, 2, MEM | SERR | INTX_DISABLE)        # virtual bits differ from hardware
    r.write(0x10, 4, 0xFFFFFFFF)                    # BAR0 in sizing mode
    r.write(0x30, 4, 0xFFFFFFFF)                    # ROM too
    r.write(0x00, 2, 0)                             # one denied write
    r.cs.allow_interrupt_control = True
    r.cs.permissive = True


def test_snapshot_restores_the_guest_view(rig):
    r = rig("e1000e")
    _guest_activity(r)
    view = r.cs.guest_config_dump()
    blob = r.cs.snapshot()
    restarted = ConfSpace.build(r.dev, snapshot=blob)
    assert restarted.guest_config_dump() == view
    assert restarted.state.sizing == {0x10, 0x30}
    assert restarted.allow_interrupt_control and restarted.permissive
    assert restarted.denied_writes == r.cs.denied_writes == 1
    # ...and it carries on: leaving sizing mode works in the new object.
    restarted.write(0x10, 4, 0xFDCC0000)
    assert restarted.read(0x10, 4) == (0, 0xFDCC0000)


def test_fresh_build_starts_from_captured_state(rig):
    r = rig("e1000e")
    _guest_activity(r)
    fresh = ConfSpace.build(r.dev)
    assert fresh.state.sizing == set()
    assert fresh.read(0x10, 4) == (0, 0xFDCC0000)
    assert not fresh.allow_interrupt_control


@pytest.mark.parametrize("blob", [
    b"", b"garbage", b"\xff\xfe", b"[]", b"{}", b"null", b"x" * 100000,
    json.dumps({"format": "pcibackd-confspace/1"}).encode(),
])
def test_garbage_snapshot_is_ignored(rig, blob):
    r = rig("e1000e")
    cs = ConfSpace.build(r.dev, snapshot=blob)
    assert cs.guest_config_dump() == r.cs.guest_config_dump()


def _tamper(blob: bytes, **changes) -> bytes:
    doc = json.loads(blob)
    for key, value in changes.items():
        if key.startswith("device_"):
            doc["device"][key[7:]] = value
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize("changes", [
    {"sizing": [0x40]},                  # not a BAR
    {"sizing": [0x11]},
    {"sizing": "0x10"},
    {"command": 0x0004},                 # bus master is not an emulated bit
    {"command": -1},
    {"command": True},
    {"enabled": 1},
    {"denied_writes": -5},
    {"permissive_override": "yes"},
    {"device_bdf": "0000:00:03.0"},      # another device's snapshot
    {"device_vendor": 0x1234},
    {"extra": 1},
])
def test_tampered_snapshot_is_rejected(rig, changes):
    r = rig("e1000e")
    r.write(0x10, 4, 0xFFFFFFFF)
    good = r.cs.snapshot()
    assert ConfSpace.build(r.dev, snapshot=good).state.sizing == {0x10}
    cs = ConfSpace.build(r.dev, snapshot=_tamper(good, **changes))
    assert cs.state.sizing == set()
    assert cs.read(0x10, 4) == (0, 0xFDCC0000)


def test_snapshot_cannot_move_a_bar(rig):
    """BAR addresses are never taken from a snapshot: they are captured at every build."""
    r = rig("e1000e")
    doc = json.loads(r.cs.snapshot())
    assert not any("fdcc" in json.dumps(v) for v in doc.values())


def test_on_change_called_for_state_changes_only(rig):
    r = rig("e1000e")
    calls = []
    r.cs.on_change = lambda: calls.append(r.cs.snapshot())
    r.write(0x0C, 1, 0x10)               # hardware register: no emulated state
    r.write(0x00, 2, 0)                  # denied: counted, not persisted
    assert calls == []
    r.write(0x10, 4, 0xFFFFFFFF)
    assert len(calls) == 1 and json.loads(calls[-1])["sizing"] == [0x10]
    r.write(0x10, 4, 0xFFFFFFFF)         # already sizing: no change
    assert len(calls) == 1
    r.write(4, 2, r.read(4, 2) ^ SERR)
    assert len(calls) == 2
    r.cs.allow_interrupt_control = True
    r.cs.permissive = True
    assert len(calls) == 4


def test_on_change_failure_does_not_fail_the_guest(rig):
    r = rig("e1000e")

    def boom():
        raise RuntimeError("disk full")
    r.cs.on_change = boom
    r.write(0x10, 4, 0xFFFFFFFF)
    assert r.read(0x10, 4) == 0xFFFE0000


def test_set_policy_keeps_state_and_applies_hiding(rig):
    r = rig("e1000e")
    r.write(0x10, 4, 0xFFFFFFFF)
    r.write(4, 2, r.read(4, 2) ^ SERR)
    cmd = r.read(4, 2)
    r.cs.set_policy(DevicePolicy(hidden_caps=frozenset({0x05})))
    assert r.read(0x10, 4) == 0xFFFE0000
    assert r.read(4, 2) == cmd
    assert r.read(0xC8, 2) >> 8 == 0xE0          # PM now links past MSI (0xd0) to PCIe
    r.cs.set_policy(DevicePolicy())
    assert r.read(0xC8, 2) >> 8 == 0xD0


def test_runtime_permissive_overrides_policy(rig):
    r = rig("e1000e", DevicePolicy(permissive=True))
    assert r.cs.permissive
    r.cs.permissive = False
    r.cs.set_policy(DevicePolicy(permissive=True))
    assert not r.cs.permissive
    r.cs.permissive = None                       # back to the policy's value
    assert r.cs.permissive
