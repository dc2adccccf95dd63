"""Zoo sweep, second half: restoring state, where Linux does write the device.

* A function that lost its BARs (a D3hot->D0 transition without NoSoftRst, a reset)
  gets each one back when the guest writes the value it is shown, exactly where
  Linux's bar_write/rom_write would ("restoration of bar value": the device's
  register differs and the guest writes the shown value), except the documented
  deviations in RESTORE_DEVIATIONS, where pcibackd writes nothing.
* A worker restart (the ConfSpace rebuilt from its snapshot) shows the guest the
  same view after any write sequence.
* Release: the seize-time header comes back after any guest write sequence, with
  Bus Master off (Linux disables the function again), VFs included.
* Permissive mode: no write sequence raises.
"""

from __future__ import annotations

import random

import pytest
from confspace_support import make_rig
from linux_oracle import U32, bar_layout, legacy_caps, linux_bar, permissive_fields

from simdom0.dumps import list_zoo, load_dump
from pcibackd.confspace import ConfSpace, DevicePolicy
from pcibackd.hostpci.port import Resource
from pcibackd.hostpci.release import capture_header, restore_header
from pcibackd.wire.pciif import Err

ZOO = sorted(list_zoo())
FIXED = Resource.IORESOURCE_PCI_FIXED

# (reason, predicate over (resource, dump)): BARs Linux would write back and pcibackd never does.
RESTORE_DEVIATIONS = (
    ("the kernel fixed this address (legacy IDE ports, the VGA shadow ROM): it is not what "
     "the register decodes, and writing it would move the device's BAR or ROM onto legacy "
     "or shadow ranges dom0 owns", lambda res, d: bool(res.flags & FIXED)),
    ("an SR-IOV VF's BAR registers are read-only zero (its PF places it): Linux's write "
     "is a no-op in hardware, pcibackd skips it", lambda res, d: d.physfn is not None),
)


def _rig(tmp_path, name, **kw):
    return make_rig(tmp_path / name, list_zoo()[name], **kw)


def _resource_of(d, index: int) -> Resource:
    """The kernel resource behind BAR ``index`` (a 64-bit BAR's upper half: its lower's)."""
    if 0 < index < 6 and d.resources[index - 1].flags & Resource.IORESOURCE_MEM_64:
        return d.resources[index - 1]
    return d.resources[index] if index < len(d.resources) else Resource(0, 0, 0)


def test_the_zoo_exercises_every_restore_deviation():
    dumps = [load_dump(path) for path in list_zoo().values()]
    for reason, hit in RESTORE_DEVIATIONS:
        assert any(hit(res, d) and res.flags for d in dumps for res in d.resources[:7]), reason


def _deviation(res: Resource, d) -> str | None:
    return next((reason for reason, hit in RESTORE_DEVIATIONS if hit(res, d)), None)


@pytest.mark.parametrize("name", ZOO)
def test_lost_bars_come_back_where_linux_restores_them(tmp_path, name):
    d = load_dump(list_zoo()[name])
    r = _rig(tmp_path, name)
    layout = bar_layout(r.dev.config_bytes())
    for off in layout:
        r.dev.poke(off, 4, 0)                                # the device lost its BARs
    r.dev.clear_write_log()
    for off, index in layout.items():
        value = linux_bar(d.resources, index)[0]
        hw_before = r.hw(off, 4)
        r.write(off, 4, value)
        linux_writes = hw_before != value                    # tmp != bar->val && value == val
        res = _resource_of(d, index)
        wrote = [rec for rec in r.log() if rec.offset == off]
        if linux_writes and _deviation(res, d):
            assert wrote == [], (hex(off), _deviation(res, d))
        else:
            assert [(rec.size, rec.value) for rec in wrote] == \
                ([(4, value)] if linux_writes else []), hex(off)
        r.dev.clear_write_log()


def _random_writes(r, rng: random.Random, count: int) -> None:
    size_cfg = r.cs.layout.config_size
    for _ in range(count):
        size = rng.choice((1, 2, 4))
        off = rng.randrange(0, 0x40 if rng.random() < 0.6 else size_cfg, size)
        value = rng.choice((rng.getrandbits(8 * size), (1 << 8 * size) - 1, 0))
        assert r.cs.write(off, size, value) in (Err.success, Err.access_denied)


@pytest.mark.parametrize("name", ZOO)
def test_a_rebuilt_confspace_shows_the_same_view(tmp_path, name):
    r = _rig(tmp_path, name)
    r.cs.allow_interrupt_control = True
    _random_writes(r, random.Random(f"snap-{name}"), 200)
    again = ConfSpace.build(r.dev, None, r.cs.snapshot())
    again.allow_interrupt_control = True
    assert again.guest_config_dump() == r.cs.guest_config_dump()


@pytest.mark.parametrize("name", ZOO)
def test_release_gives_back_the_seize_time_header(tmp_path, name):
    r = _rig(tmp_path, name)
    saved = capture_header(r.dev)
    r.cs.permissive = True                                   # the worst a guest can leave
    _random_writes(r, random.Random(f"release-{name}"), 300)
    restore_header(r.dev, saved)
    assert capture_header(r.dev) == capture_header(r.dev)    # still answers, stable
    now = r.dev.config_bytes()
    command = int.from_bytes(saved[4:6], "little")
    # Bus Master off (no DMA for a function nobody drives); a normal function's INTx back on
    want = command & ~0x4 & ~0x400 if saved[0x0E] & 0x7F == 0 else command & ~0x10
    assert int.from_bytes(now[4:6], "little") == want
    if saved[0x0E] & 0x7F == 0 and not load_dump(list_zoo()[name]).physfn:
        assert now[0x10:0x34] == saved[0x10:0x34]           # BARs and ROM as seized


@pytest.mark.parametrize("name", ZOO)
def test_permissive_writes_change_no_more_than_linux_would(tmp_path, name):
    """Permissive: every device change is one Linux would make too (a field's handler, or an
    access made only of bytes no field covers), and no write sequence raises."""
    d = load_dump(list_zoo()[name])
    r = _rig(tmp_path, name, policy=DevicePolicy(permissive=True))
    r.cs.allow_interrupt_control = True
    field, allowed = permissive_fields(r.dev.config_bytes())
    bars = {off: linux_bar(d.resources, index)[0]
            for off, index in bar_layout(r.dev.config_bytes()).items()}
    rng = random.Random(f"perm-{name}")
    size_cfg = r.cs.layout.config_size
    for step in range(300):
        size = rng.choice((1, 2, 4))
        off = rng.randrange(0, 0x40 if rng.random() < 0.5 else size_cfg, size)
        value = rng.choice((rng.getrandbits(8 * size), (1 << 8 * size) - 1, 0))
        r.dev.clear_write_log()
        assert r.cs.write(off, size, value) in (Err.success, Err.access_denied)
        handled = any(field[off:off + size])
        for rec in r.log():
            if rec.offset in bars and rec.size == 4:
                assert rec.value == bars[rec.offset], (step, rec)
                continue
            for i in range(rec.size):
                pos = rec.offset + i
                ok = allowed[pos] if handled or field[pos] else 0xFF
                assert (rec.changed >> 8 * i) & 0xFF & ~ok == 0, (step, hex(off), size, rec)
    assert len(r.cs.guest_config_dump()) == size_cfg


def _chain(cfg: bytes) -> list[tuple[int, int, bool]]:
    """(offset, id, extended) of both capability lists of a config image, in chain order."""
    out = [(base, cap, False) for base, cap in legacy_caps(cfg)]
    pos, seen = 0x100, set()
    while len(cfg) > 0x100 and pos >= 0x100 and pos not in seen:
        seen.add(pos)
        hdr = int.from_bytes(cfg[pos:pos + 4], "little")
        if hdr in (0, U32):
            break
        out.append((pos, hdr & 0xFFFF, True))
        pos = hdr >> 20 & 0xFFC
    return out


@pytest.mark.parametrize("name", ZOO)
def test_hiding_each_capability_unlinks_exactly_it(tmp_path, name):
    """pcibackd's own policy feature (Linux hides nothing): over every capability of every
    zoo function, the guest's lists skip exactly the hidden one and writes to it are dropped."""
    chain = _chain(load_dump(list_zoo()[name]).config)
    for index, (base, cap_id, ext) in enumerate(chain):
        policy = DevicePolicy(hidden_ext_caps=frozenset({cap_id})) if ext else \
            DevicePolicy(hidden_caps=frozenset({cap_id}))
        r = _rig(tmp_path / f"h{index}", name, policy=policy)
        view = r.cs.guest_config_dump()
        want = [(o, c, e) for o, c, e in chain if (c, e) != (cap_id, ext)]
        got = _chain(view)
        if ext and base == 0x100:           # a null head (ID 0) keeps the list's start
            got = [item for item in got if item != (0x100, 0, True)]
        assert [(c, e) for _, c, e in got] == [(c, e) for _, c, e in want], (hex(cap_id), ext)
        before = r.dev.config_bytes()
        rng = random.Random(f"hide-{name}-{index}")
        for _ in range(40):
            size = rng.choice((1, 2, 4))
            off = base + rng.randrange(0, 0x10, size)
            r.cs.write(off, size, rng.getrandbits(8 * size))
        assert r.dev.config_bytes()[base:base + 0x10] == before[base:base + 0x10]


@pytest.mark.parametrize("name", ZOO)
def test_permissive_command_dword_rmw_keeps_status_errors(tmp_path, name):
    """Linux: an access that overlaps a field is handled by the fields alone, so a dword
    read-modify-write of COMMAND (NetBSD writes only dwords) leaves STATUS's RW1C error bits
    pending even when permissive; a STATUS write of its own clears them."""
    r = _rig(tmp_path, name, policy=DevicePolicy(permissive=True))
    errors = 0xF900                    # parity, signalled/received aborts, SERR: RW1C
    r.dev.poke(6, 2, r.hw(6, 2) | errors)
    pending = r.hw(6, 2) & errors
    assert pending
    dword = r.cs.read(4, 4)[1]
    assert dword >> 16 & pending == pending                 # the guest sees them
    r.write(4, 4, dword)
    assert r.hw(6, 2) & errors == pending
    r.write(6, 2, pending)
    assert r.hw(6, 2) & errors == 0
