"""Bad MSI/MSI-X input through the whole stack (simulated guest, worker, broker, simulated Xen).

With tests/e2e/test_msi.py (129 entries, entries beyond the table, duplicates,
nvec 0, more vectors than the table, MSI while MSI-X is on and the reverse,
enable when already on, a worker killed between map and answer) this covers
every bad input of the MSI issue in the simulation: memory decoding off, disable
when nothing is enabled, a function without either capability, a guest that
enables 1000 times, and an enable racing a hot-unplug.
"""

from __future__ import annotations

import errno

from helpers import detach_in_background
from pcibackd.hostpci.port import find_capability
from pcibackd.irq.function import control_offset
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Err, Op
from pcibackd.wire.pciregs import CAP_MSIX, COMMAND, COMMAND_MEM, MSIX_ENABLE
from simdom0.physdev import read_state
from simdom0.platform import physdev_state_path
from waiting import wait_until

NVME, NIC, OLD = "0000:00:05.0", "0000:00:06.0", "0000:00:07.0"
G_NVME, G_NIC, G_OLD = BDF(0, 0, 0, 0), BDF(0, 0, 1, 0), BDF(0, 0, 2, 0)


class Guest:
    def __init__(self, dom0, domid: int = 1) -> None:
        self.dom0, self.domid = dom0, domid
        self.hw = {G_NVME: dom0.add_device("nvme", NVME), G_NIC: dom0.add_device("e1000e", NIC),
                   G_OLD: dom0.add_device("rtl8139", OLD)}
        dom0.create_guest(domid, [NVME, NIC, OLD])
        self.front = dom0.frontend(domid)
        assert [d.bdf for d in self.front.connect()] == [G_NVME, G_NIC, G_OLD]

    def xen(self) -> dict:
        path = physdev_state_path(self.dom0.sim_dir)
        return read_state(path) if path.exists() else {"bindings": [], "double_maps": [], "prepared": []}

    def pirqs(self, bdf: str | None = None) -> list[int]:
        return sorted(b["pirq"] for b in self.xen()["bindings"]
                      if b["domid"] == self.domid and bdf in (None, b["bdf"]))

    def msix_on(self, guest_bdf: BDF) -> bool:
        dev = self.hw[guest_bdf]
        return bool(dev.read(control_offset(find_capability(dev.read, CAP_MSIX)), 2) & MSIX_ENABLE)


def test_msix_with_memory_decoding_off_is_enxio_and_maps_nothing(dom0):
    g = Guest(dom0)
    hw = g.hw[G_NVME]
    command = hw.read(COMMAND, 2)
    hw.write(COMMAND, 2, command & ~COMMAND_MEM)          # the host's view: decoding off
    err, value, _ = g.front.msix_op(Op.enable_msix, G_NVME, 2, (0, 1))
    assert (err, value) == (-errno.ENXIO, 2)
    assert g.pirqs() == [] and not g.msix_on(G_NVME)
    hw.write(COMMAND, 2, command)
    assert g.front.enable_msix(G_NVME, [0, 1]).ok        # and fine once it decodes again


def test_disable_when_nothing_is_enabled_answers_the_intx_irq_and_touches_nothing(dom0):
    g = Guest(dom0)
    before = {bdf: dev.config_bytes() for bdf, dev in g.hw.items()}
    for bdf in (G_NVME, G_NIC, G_OLD):
        for off in (g.front.disable_msi(bdf), g.front.disable_msix(bdf)):
            assert (off.err, off.value) == (Err.success, g.hw[bdf].info.irq)
    assert g.pirqs() == [] and {bdf: dev.config_bytes() for bdf, dev in g.hw.items()} == before


def test_a_function_without_msi_or_msix_is_refused_both(dom0):
    g = Guest(dom0)
    assert g.front.enable_msi(G_OLD).err == Err.op_failed
    err, value, _ = g.front.msix_op(Op.enable_msix, G_OLD, 1, (0,))
    assert (err, value) == (-errno.EINVAL, -errno.EINVAL & 0xFFFFFFFF)     # value: a u32 on the wire
    assert g.pirqs() == [] and OLD not in g.xen()["prepared"]     # never prepared: Xen would crash


def test_a_guest_enabling_a_thousand_times_leaks_no_pirq(dom0):
    g = Guest(dom0)
    start = g.pirqs()
    for i in range(1000):
        r = g.front.enable_msix(G_NVME, [0, 1, 2])
        assert r.ok if i % 100 == 0 else r.result == -errno.EALREADY, (i, r)
        if i % 100 == 99:
            assert g.front.disable_msix(G_NVME).ok
            assert g.pirqs() == start, i
    assert g.pirqs() == start and not g.msix_on(G_NVME)
    assert g.xen()["double_maps"] == [] and g.front.timeouts == 0


def test_enable_racing_a_hot_unplug_leaves_nothing_mapped(dom0):
    g = Guest(dom0)
    results = []
    t, done = detach_in_background(dom0.xenstored.socket_path, 1, NVME)
    try:
        # the guest keeps enabling while the unplug goes on, until its function is gone
        while not done.is_set() or G_NVME in [d.bdf for d in g.front.devices]:
            if G_NVME in [d.bdf for d in g.front.devices]:
                results.append(g.front.msix_op(Op.enable_msix, G_NVME, 2, (0, 1))[0])
            g.front.follow(timeout=0.01)
    finally:
        t.join()
    assert results and set(results) <= {0, -errno.EALREADY, Err.dev_not_found, -errno.ENODEV}, results
    wait_until(lambda: g.pirqs(NVME) == [] and NVME not in g.xen()["prepared"],
               what="the unplugged function unmapped and released")
    assert not g.msix_on(G_NVME) and g.xen()["double_maps"] == []
    assert g.front.enable_msix(G_NIC, [0]).ok            # the guest's other functions still work
