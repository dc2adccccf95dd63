"""The simulated Xen's state file: a snapshot and an append-only log of maps and unmaps."""

from __future__ import annotations

import json

from pcibackd.irq.function import Kind, record_for
from pcibackd.wire.bdf import BDF
from simdom0.hostpci import SimHost
from simdom0.physdev import SimPhysdev, read_state

DISK = BDF(0, 4, 0, 0)


def test_maps_are_appended_and_survive_a_new_process(tmp_path):
    host = SimHost(tmp_path / "sim")
    dev = host.add("nvme", DISK)
    state = tmp_path / "physdev.json"
    xen = SimPhysdev(lambda bdf: dev, assume_assigned=True, extra_guest_irqs=128, state_file=state)
    base = record_for(dev.read, dev.info).table_base
    xen.prepare_msix(DISK)                              # a snapshot
    snapshot = state.read_bytes()
    pirqs = [xen.map_pirq(5, Kind.msix, DISK, e, base) for e in range(64)]
    xen.unmap_pirq(5, pirqs[0])
    assert state.read_bytes() == snapshot               # 65 appends, no rewrite
    assert len((tmp_path / "physdev.json.log").read_bytes().splitlines()) == 65
    assert sorted(b["pirq"] for b in read_state(state)["bindings"]) == sorted(pirqs[1:])
    with open(tmp_path / "physdev.json.log", "ab") as f:
        f.write(b'{"generation": 1, "unm')                # a writer killed mid-line
    again = SimPhysdev(lambda bdf: dev, assume_assigned=True, extra_guest_irqs=128, state_file=state)
    assert sorted(b.pirq for b in again.bindings(5)) == sorted(pirqs[1:])
    assert not (tmp_path / "physdev.json.log").exists()    # compacted at start
    assert json.loads(state.read_text())["bindings"] == read_state(state)["bindings"]


def test_a_stale_generations_log_is_ignored(tmp_path):
    host = SimHost(tmp_path / "sim")
    dev = host.add("nvme", DISK)
    state = tmp_path / "physdev.json"
    xen = SimPhysdev(lambda bdf: dev, assume_assigned=True, extra_guest_irqs=128, state_file=state)
    base = record_for(dev.read, dev.info).table_base
    xen.prepare_msix(DISK)
    pirq = xen.map_pirq(5, Kind.msix, DISK, 0, base)
    log = (tmp_path / "physdev.json.log").read_bytes()
    xen.unmap_pirq(5, pirq)
    xen.destroy_domain(5)                               # a snapshot: a new generation
    (tmp_path / "physdev.json.log").write_bytes(log)    # as if the old log outlived it
    assert read_state(state)["bindings"] == []
