"""The device lifecycle's bad input on the simulated dom0, beyond test_lifecycle.py: functions
that vanish (at add, at attach, while held, at release), functions held elsewhere, a stub that
refuses and a domain that dies during a seize=1 attach, unknown functions in a create, xl
failing and a domain dying before its unpause.  Each error names the function (or the line);
afterwards the pool (pool.json), the simulated drivers and xenstore are as they were."""

from __future__ import annotations

import json
import sys

from pcibackd.wire.paths import backend_path
from simdom0 import drivers
from test_lifecycle import (CFG, E1000E, EDU, TESTDEV, TESTDEV1, ctl, domains, fails, host, ok, pci_root,  # noqa: F401
                            pool, running, xl)
from waiting import wait_until


def saved_pool(dom0) -> set[str]:
    path = dom0.sim_dir / "state" / "pool.json"
    return {f["bdf"] for f in json.loads(path.read_text())["functions"]} if path.exists() else set()


def quarantined(dom0) -> set[str]:
    return {d["bdf"] for d in json.loads(ok(dom0, "--json", "devices")) if d["quarantined"]}


def no_backend(dom0, domid: int) -> bool:
    return dom0.xs.read(f"{backend_path(domid)}/num_devs") is None


def test_a_function_that_vanishes_while_it_is_taken_from_dom0(running):
    dom0 = running
    drivers.vanish_on(pci_root(dom0), "bind", E1000E)
    err = fails(dom0, 6, "assignable-add", E1000E)
    assert f"PCI function {E1000E} vanished" in err and "not in the pool" in err
    assert E1000E not in pool(dom0) and E1000E not in saved_pool(dom0)
    assert E1000E not in quarantined(dom0)


def test_a_function_that_vanishes_during_an_attach(running):
    dom0 = running
    ok(dom0, "assignable-add", TESTDEV)
    ok(dom0, "assignable-add", TESTDEV1)
    dom0.toolstack.create_domain(3, "g3")
    drivers.vanish_on(pci_root(dom0), "give", TESTDEV1)         # TESTDEV is given first, then this one goes
    err = fails(dom0, 1, "pci-attach", "g3", "00:06.*")
    assert f"no PCI function {TESTDEV1}" in err and "nothing was attached" in err
    assert no_backend(dom0, 3)
    assert drivers.state(pci_root(dom0), TESTDEV)["assigned"] is None      # the first one taken back
    listed = pool(dom0)
    assert listed[TESTDEV]["held_by"] is None and not listed[TESTDEV1]["present"]
    assert saved_pool(dom0) == {TESTDEV, TESTDEV1}
    ok(dom0, "pci-attach", "g3", TESTDEV)                        # what is left still works


def test_a_function_that_vanishes_while_held_and_comes_back(running):
    dom0 = running
    ok(dom0, "assignable-add", E1000E)
    dom0.toolstack.create_domain(3, "g3")
    ok(dom0, "pci-attach", "g3", E1000E)
    front = dom0.frontend(3)
    assert len(front.connect()) == 1
    drivers.surprise_remove(pci_root(dom0), E1000E)
    assert f"{E1000E}" in ok(dom0, "assignable-list") and not pool(dom0)[E1000E]["present"]
    assert pool(dom0)[E1000E]["held_by"] == 3
    assert [d["dev"] for d in json.loads(ok(dom0, "--json", "pci-list", "g3"))["devices"]] == [E1000E]
    err = fails(dom0, 1, "assignable-remove", E1000E)
    assert f"{E1000E} is attached to domain 3" in err

    assert dom0.toolstack.destroy(3) is True                     # its release: the function is gone
    wait_until(lambda: pool(dom0)[E1000E]["held_by"] is None, what="released")
    wait_until(lambda: dom0.guest_status(3) is None, what="dom3's worker gone")
    assert E1000E in quarantined(dom0)                           # it did not answer: no reset
    assert "gone from the host" in ok(dom0, "assignable-remove", "-r", E1000E)
    assert pool(dom0) == {} and saved_pool(dom0) == set()

    dom0.add_device("e1000e", E1000E)                            # plugged in again
    drivers.set_driver(pci_root(dom0), E1000E, "e1000e")
    assert "pm reset ok" in ok(dom0, "assignable-add", E1000E)   # reset fine: no longer quarantined
    assert E1000E not in quarantined(dom0)
    dom0.toolstack.create_domain(4, "g4")
    ok(dom0, "pci-attach", "g4", E1000E)


def test_functions_held_elsewhere_are_not_moved(running):
    dom0 = running
    dom0.create_guest(3, [EDU], name="g3")                       # given by a toolstack, outside the pool
    err = fails(dom0, 1, "assignable-add", EDU)
    assert f"{EDU} is attached to domain 3 outside the pool" in err
    assert EDU not in saved_pool(dom0) and drivers.state(pci_root(dom0), EDU)["driver"] == "edu"

    ok(dom0, "assignable-add", E1000E)
    dom0.toolstack.create_domain(4, "g4")
    ok(dom0, "pci-attach", "g4", E1000E)
    err = fails(dom0, 1, "assignable-remove", "-r", E1000E)
    assert f"{E1000E} is attached to domain 4: pci-detach it first" in err
    assert pool(dom0)[E1000E]["held_by"] == 4 and drivers.state(pci_root(dom0), E1000E)["assigned"] == 4
    assert drivers.state(pci_root(dom0), E1000E)["driver"] == "pci-stub"
    err = fails(dom0, 1, "pci-attach", "g3", E1000E)
    assert f"{E1000E} is already assigned to domain 4" in err


def test_seize_at_attach_undone_when_the_stub_refuses_or_the_domain_dies(running):
    dom0 = running
    dom0.toolstack.create_domain(3, "g3")
    drivers.refuse_stub(pci_root(dom0), TESTDEV)
    err = fails(dom0, 1, "pci-attach", "g3", f"{TESTDEV},seize=1")
    assert TESTDEV in err and "refused to bind" in err
    assert TESTDEV not in saved_pool(dom0) and drivers.state(pci_root(dom0), TESTDEV)["driver"] == "pci-testdev"
    assert no_backend(dom0, 3)

    drivers.kill_on_give(pci_root(dom0))
    err = fails(dom0, 1, "pci-attach", "g3", f"{EDU},seize=1")
    assert f"domain 3 died during the attach of {EDU}" in err
    st = drivers.state(pci_root(dom0), EDU)
    assert (st["driver"], st["quarantined"], st["assigned"]) == ("edu", False, None)   # back with dom0
    assert saved_pool(dom0) == set() and dom0.xs.ls("/local/domain/0/backend/pci") == []


def test_create_with_an_unknown_function(running, xl, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b="0000:0a:00.0"))
    err = fails(dom0, 1, "create", "--xl", xl, str(cfg))
    assert "no PCI function 0000:0a:00.0" in err and "destroyed" in err
    assert domains(dom0) == {}
    wait_until(lambda: pool(dom0)[EDU]["held_by"] is None, what="EDU free")
    wait_until(lambda: drivers.state(pci_root(dom0), EDU)["assigned"] is None, what="EDU revoked")


def fake_xl(tmp_path, name: str, body: str) -> str:
    """A wrapper around the simulated xl: ``body`` runs first (shell), then the real one."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\nexec {sys.executable} -m simdom0.xl \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_create_when_xl_fails(running, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    xl = fake_xl(tmp_path, "xl-broken",
                 'if [ "$1" = create ]; then echo "libxl: error: cannot allocate memory" >&2; exit 3; fi')
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b=E1000E))
    err = fails(dom0, 1, "create", "--xl", xl, str(cfg))
    assert "xl create failed: libxl: error: cannot allocate memory" in err
    assert domains(dom0) == {} and pool(dom0)[EDU]["held_by"] is None
    assert drivers.state(pci_root(dom0), E1000E)["driver"] == "e1000e"       # pci= never reached
    err = fails(dom0, 1, "create", "--xl", str(tmp_path / "no-such-xl"), str(cfg))
    assert "xl create failed" in err and "no-such-xl" in err


def test_create_when_the_domain_dies_before_unpause(running, tmp_path):
    dom0 = running
    ok(dom0, "assignable-add", EDU)
    ok(dom0, "assignable-add", E1000E)
    xl = fake_xl(tmp_path, "xl-dies",
                 f'if [ "$1" = unpause ]; then {sys.executable} -m simdom0.xl destroy "$2" || exit 9; fi')
    cfg = tmp_path / "g1.cfg"
    cfg.write_text(CFG.format(a=EDU, b=E1000E))
    err = fails(dom0, 1, "create", "--xl", xl, str(cfg))
    assert "xl unpause g1" in err and "destroyed" in err and "back in the pool" in err
    assert domains(dom0) == {}
    assert dom0.xs.ls("/local/domain/0/backend/pci") == []
    wait_until(lambda: all(f["held_by"] is None for f in pool(dom0).values()), what="functions free")
    wait_until(lambda: all(drivers.state(pci_root(dom0), b)["assigned"] is None for b in (EDU, E1000E)),
               what="grants revoked")
    assert saved_pool(dom0) == {EDU, E1000E}
