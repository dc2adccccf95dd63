"""The pool's resets on the simulated dom0: a function is reset as it joins the pool (as
xen-pciback's stub does), the reset is reported by ``pcibackctl devices``, a failed one
quarantines the function and pci-attach refuses it up front; the lifecycle reads only the
backends it follows."""

from __future__ import annotations

import json
from pathlib import Path

from pcibackd.daemon.lifecycle import Lifecycle
from pcibackd.daemon.pool import Pool
from pcibackd.hostpci.port import find_capability
from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import backend_path
from pcibackd.wire.pciif import Err, XenbusState as S
from pcibackd.wire.pciregs import CAP_MSIX, COMMAND, COMMAND_MASTER, MSIX_ENABLE, MSIX_FLAGS
from simdom0 import drivers
from simdom0.drivers import SimDrivers
from simdom0.platform import SimPlatform
from test_lifecycle import E1000E, EDU, fails, host, ok, pci_root, pool, running  # noqa: F401 (fixtures)
from waiting import wait_until

NVME, NVME2 = "0000:00:0a.0", "0000:00:0b.0"
G0 = BDF(0, 0, 0, 0)


def listed(dom0) -> dict[str, dict]:
    return {d["bdf"]: d for d in json.loads(ok(dom0, "--json", "devices"))}


def dirty(dev) -> None:
    """What a dom0 driver leaves behind: bus master on, MSI-X enabled."""
    dev.write(COMMAND, 2, dev.read(COMMAND, 2) | COMMAND_MASTER)
    cap = find_capability(dev.read, CAP_MSIX)
    dev.write(cap + MSIX_FLAGS, 2, dev.read(cap + MSIX_FLAGS, 2) | MSIX_ENABLE)


def test_a_function_joining_the_pool_is_reset_and_reported(running):
    dom0 = running
    nvme = dom0.add_device("nvme", NVME)
    drivers.set_driver(pci_root(dom0), NVME, "nvme")
    dirty(nvme)
    out = ok(dom0, "assignable-add", NVME)
    assert "was bound to nvme" in out and "flr reset ok" in out
    reset = listed(dom0)[NVME]["reset"]
    assert (reset["method"], reset["result"], reset["event"]) == ("flr", "ok", "seize")
    assert not listed(dom0)[NVME]["quarantined"]
    assert [NVME, "-", "flr", "ok", "at", "seize", "-"] in [r.split() for r in ok(dom0, "devices").splitlines()]
    assert not nvme.read(COMMAND, 2) & COMMAND_MASTER                   # dom0's settings gone
    assert not nvme.read(find_capability(nvme.read, CAP_MSIX) + MSIX_FLAGS, 2) & MSIX_ENABLE

    dom0.toolstack.create_domain(3, "g3")                               # the first guest sees it clean
    ok(dom0, "pci-attach", "g3", NVME)
    front = dom0.frontend(3)
    front.connect()
    assert front.conf_read(G0, COMMAND, 2) == (Err.success, nvme.read(COMMAND, 2))
    assert f"seized {NVME}: at seize: flr reset ok" in dom0.daemon_log.read_text()


def test_a_failed_reset_at_seize_quarantines_and_attach_refuses_it(running):
    dom0 = running
    nvme = dom0.add_device("nvme", NVME)
    drivers.set_driver(pci_root(dom0), NVME, "nvme")
    nvme.fail_resets("error")
    out = ok(dom0, "assignable-add", NVME)
    assert "reset failed" in out and "quarantined" in out and f"quarantine clear --force {NVME}" in out
    assert pool(dom0)[NVME]["bound"] == "pci-stub"                      # in the pool, but held back
    entry = listed(dom0)[NVME]
    assert entry["quarantined"] and (entry["reset"]["result"], entry["reset"]["event"]) == ("failed", "seize")

    dom0.toolstack.create_domain(3, "g3")
    err = fails(dom0, 1, "pci-attach", "g3", NVME)
    assert f"{NVME} is quarantined" in err and f"pcibackctl quarantine clear --force {NVME}" in err
    assert dom0.xs.read(f"{backend_path(3)}/num_devs") is None          # nothing written
    assert drivers.state(pci_root(dom0), NVME)["assigned"] is None

    nvme.fail_resets(None)
    ok(dom0, "pci-attach", "--force", "g3", NVME)                        # --force: cleared and attached
    assert not listed(dom0)[NVME]["quarantined"]
    assert dom0.xs.read(f"{backend_path(3)}/dev-0") == NVME
    assert "quarantine cleared by pci-attach --force" in dom0.daemon_log.read_text()


def test_seize_at_attach_whose_reset_fails_leaves_nothing(running):
    dom0 = running
    nvme = dom0.add_device("nvme", NVME)
    drivers.set_driver(pci_root(dom0), NVME, "nvme")
    nvme.fail_resets("dead")
    dom0.toolstack.create_domain(3, "g3")
    err = fails(dom0, 1, "pci-attach", "g3", f"{NVME},seize=1")
    assert f"{NVME} is quarantined" in err and "at seize" in err
    assert NVME not in pool(dom0) and drivers.state(pci_root(dom0), NVME)["driver"] == "nvme"
    assert dom0.xs.read(f"{backend_path(3)}/num_devs") is None


def test_attach_refuses_a_function_whose_release_reset_failed(running):
    dom0 = running
    nvme = dom0.add_device("nvme", NVME)
    ok(dom0, "assignable-add", NVME)
    dom0.toolstack.create_domain(3, "g3")
    ok(dom0, "pci-attach", "g3", NVME)
    front = dom0.frontend(3)
    front.connect()
    nvme.fail_resets("error")
    assert dom0.toolstack.destroy(3) is True
    wait_until(lambda: listed(dom0)[NVME]["quarantined"], what="quarantined at release")
    wait_until(lambda: pool(dom0)[NVME]["held_by"] is None, what="back in the pool")

    dom0.toolstack.create_domain(4, "g4")
    err = fails(dom0, 1, "pci-attach", "g4", NVME)
    assert f"{NVME} is quarantined" in err and "flr reset failed" in err and "quarantine clear --force" in err
    assert dom0.xs.read(f"{backend_path(4)}/num_devs") is None
    ok(dom0, "quarantine", "clear", "--force", NVME)
    ok(dom0, "pci-attach", "g4", NVME)


# ------------------------------------------------------ following backends --
class CountingXs:
    """A XenStore whose reads are recorded (path of each read/ls/exists)."""

    def __init__(self, xs):
        self.xs, self.paths = xs, []

    def __getattr__(self, name):
        fn = getattr(self.xs, name)
        if name not in ("read", "ls", "exists"):
            return fn

        def counted(path, *a, **kw):
            self.paths.append(path)
            return fn(path, *a, **kw)
        return counted


def test_backend_events_read_only_the_followed_backends(host, tmp_path):
    dom0 = host
    xs = CountingXs(dom0.xs)
    life = Lifecycle(xs, SimDrivers(pci_root(dom0)), Pool(tmp_path / "lib"), SimPlatform(dom0.sim_dir, 0),
                     tmp_path / "state")
    for domid in range(10, 30):                 # other guests' backends, not ours to follow
        dom0.create_guest(domid, [f"0000:07:{domid:02x}.0"])
    life.add(BDF.parse(EDU))
    life.add(BDF.parse(E1000E))
    dom0.toolstack.create_domain(3, "g3")
    life.attach("g3", EDU)
    be = backend_path(3)

    xs.paths.clear()
    life.backends_changed(set(range(10, 30)))
    assert xs.paths == []                       # nothing it follows changed: no read at all
    life.backends_changed({3, *range(10, 30)})
    assert xs.paths and all(p.startswith(be + "/") for p in xs.paths), xs.paths
    assert life.given == {3: {BDF.parse(EDU)}}

    # a hot-unplug the guest completed: the mark stays, the backend is Connected again
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))
    life.attach("g3", E1000E)                   # hot-plugged (state 7) ...
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))     # ... and taken by the guest
    assert life.detach("g3", E1000E, force=False)["state"] == "detaching"
    assert life.detaching == {3: {BDF.parse(E1000E)}}
    restarted = Lifecycle(xs, SimDrivers(pci_root(dom0)), Pool(tmp_path / "lib"),
                          SimPlatform(dom0.sim_dir, 0), tmp_path / "state")
    assert restarted.detaching == life.detaching and restarted.given == life.given     # a new daemon finishes it
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))
    xs.paths.clear()
    life.backends_changed({3, 12})
    assert all(p.startswith(be + "/") for p in xs.paths), xs.paths
    assert dom0.xs.read(f"{be}/num_devs") == "1" and dom0.xs.read(f"{be}/dev-0") == EDU
    assert life.detaching == {} and life.given == {3: {BDF.parse(EDU)}}
    assert drivers.state(pci_root(dom0), E1000E)["assigned"] is None

    dom0.xs.rm(be)                              # the guest went: what it held comes back
    life.backends_changed({3})
    assert life.given == {} and drivers.state(pci_root(dom0), EDU)["assigned"] is None
    xs.paths.clear()
    life.backends_changed({3, *range(10, 30)})
    assert xs.paths == []


def test_hide_at_start_resets_each_function(host):
    dom0 = host
    nvme, nvme2 = dom0.add_device("nvme", NVME), dom0.add_device("nvme", NVME2)
    for bdf in (NVME, NVME2):
        drivers.set_driver(pci_root(dom0), bdf, "nvme")
    dirty(nvme)
    nvme2.fail_resets("error")
    dom0.conf.write_text(f'[devices]\nhide = ["{NVME}", "{NVME2}"]\n')
    dom0.start_daemon()
    assert {NVME, NVME2} <= set(pool(dom0))
    entries = listed(dom0)
    assert (entries[NVME]["reset"]["method"], entries[NVME]["reset"]["event"], entries[NVME]["quarantined"]) == \
        ("flr", "seize", False)
    assert not nvme.read(COMMAND, 2) & COMMAND_MASTER
    assert entries[NVME2]["quarantined"] and entries[NVME2]["reset"]["result"] == "failed"
    assert f"seized {NVME2}: at seize: flr reset failed" in dom0.daemon_log.read_text()


def test_a_removal_libxl_began_is_left_to_libxl(host, tmp_path):
    """`xl destroy` / `xl pci-detach` mark a function Closing and renumber the backend's
    entries themselves once it is Connected again: doing it a second time races libxl's own
    transaction (which then reads a vanished state-N and crashes).  Only what our pci-detach
    began gets libxl's last step from us; libxl's removal still gives the function back."""
    dom0 = host
    life = Lifecycle(dom0.xs, SimDrivers(pci_root(dom0)), Pool(tmp_path / "lib"), SimPlatform(dom0.sim_dir, 0),
                     tmp_path / "state")
    life.add(BDF.parse(EDU))
    life.add(BDF.parse(E1000E))
    dom0.toolstack.create_domain(3, "g3")
    life.attach("g3", EDU)
    be = backend_path(3)
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))
    life.attach("g3", E1000E)
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))
    dom0.toolstack.begin_detach(3, BDF.parse(EDU))            # libxl's mark, not ours
    dom0.xs.write(f"{be}/state", str(int(S.Connected)))       # the guest let go
    life.backends_changed({3})
    assert [dom0.xs.read(f"{be}/{k}") for k in ("num_devs", "dev-0", "dev-1")] == ["2", EDU, E1000E]
    assert life.given == {3: {BDF.parse(EDU), BDF.parse(E1000E)}} and life.detaching == {}
    dom0.toolstack.remove_nodes(3, BDF.parse(EDU))            # libxl's own last step
    life.backends_changed({3})
    assert life.given == {3: {BDF.parse(E1000E)}}
    assert drivers.state(pci_root(dom0), EDU)["assigned"] is None
