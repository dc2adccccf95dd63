"""The simulated dom0's driver model: which driver holds a function, in-use disks/NICs, quarantine.

Answers the daemon's :class:`pcibackd.hostpci.drivers.HostDrivers` port for the
functions of a :class:`simdom0.hostpci.SimHost`.  Per function, in its sysfs-like
directory:

* ``sim-driver.json``: ``{"driver", "quarantined", "assigned"}`` (as the kernel and Xen would know);
* ``sim-in-use`` (tests write it): why dom0 needs it; the in-use probe reports that text;
* ``sim-stub-refuses``: the stub driver's probe fails, as a missing or broken pci-stub would.

``<root>/sim-kill-on-give``: the next assignment of a function to a guest
removes that guest's domain from xenstore first (a domain dying mid-attach).
``<root>/sim-vanish-on-bind`` / ``-give`` (holding a BDF): that function is
surprise-removed (:func:`surprise_remove`) right after the stub binds it / just
before it is assigned to a guest.
Tests set all of these through the helpers below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pcibackd.hostpci.drivers import DriverError
from pcibackd.hostpci.sysfs import devices_dir
from pcibackd.wire.bdf import BDF
from pcibackd.xenstore.client import XenStore
from simdom0.hostpci import SimHost

STATE = "sim-driver.json"
IN_USE = "sim-in-use"
REFUSES = "sim-stub-refuses"
KILL_ON_GIVE = "sim-kill-on-give"


def _dir(root: Path, bdf: BDF) -> Path:
    return devices_dir(root) / str(bdf)


def _state(root: Path, bdf: BDF) -> dict:
    try:
        return json.loads((_dir(root, bdf) / STATE).read_text())
    except FileNotFoundError:
        return {"driver": None, "quarantined": False, "assigned": None}


def _save(root: Path, bdf: BDF, state: dict) -> None:
    (_dir(root, bdf) / STATE).write_text(json.dumps(state))


def set_driver(root: Path, bdf: BDF | str, driver: str | None) -> None:
    """Bind ``driver`` (a dom0 driver, as at boot)."""
    bdf = BDF.parse(str(bdf))
    _save(root, bdf, dict(_state(root, bdf), driver=driver))


def state(root: Path, bdf: BDF | str) -> dict:
    return _state(root, BDF.parse(str(bdf)))


def set_in_use(root: Path, bdf: BDF | str, reason: str) -> None:
    (_dir(root, BDF.parse(str(bdf))) / IN_USE).write_text(reason)


def refuse_stub(root: Path, bdf: BDF | str) -> None:
    (_dir(root, BDF.parse(str(bdf))) / REFUSES).write_text("")


def kill_on_give(root: Path) -> None:
    (Path(root) / KILL_ON_GIVE).write_text("")


def vanish_on(root: Path, step: str, bdf: BDF | str) -> None:
    """``bdf`` goes (surprise removal) at its next ``step``: "bind" (to the stub) or "give"."""
    (Path(root) / f"sim-vanish-on-{step}").write_text(str(bdf))


def surprise_remove(root: Path, bdf: BDF | str) -> None:
    """The function leaves the host: config reads return all-ones (also through descriptors
    already open), then its sysfs directory goes."""
    d = _dir(Path(root), BDF.parse(str(bdf)))
    config = d / "config"
    with open(config, "r+b") as f:
        f.write(b"\xff" * config.stat().st_size)
    real = d.resolve()
    if d.is_symlink():
        d.unlink()
    shutil.rmtree(real)


def _maybe_vanish(root: Path, step: str, bdf: BDF) -> None:
    hook = root / f"sim-vanish-on-{step}"
    if hook.exists() and hook.read_text() == str(bdf):
        hook.unlink()
        surprise_remove(root, bdf)


class SimDrivers:
    """The driver model of the simulated host rooted at ``root`` (``<sim_dir>/pci``)."""

    stub = "pci-stub"

    def __init__(self, root: Path):
        self.root = Path(root)

    def functions(self) -> list[BDF]:
        return SimHost(self.root).devices() if self.root.exists() else []

    def exists(self, bdf: BDF) -> bool:
        return (_dir(self.root, bdf) / "config").exists()

    def driver(self, bdf: BDF) -> str | None:
        return _state(self.root, bdf)["driver"]

    def in_use(self, bdf: BDF) -> str | None:
        try:
            return (_dir(self.root, bdf) / IN_USE).read_text() or "in use"
        except FileNotFoundError:
            return None

    def _need(self, bdf: BDF) -> dict:
        if not self.exists(bdf):
            raise DriverError(2, f"no PCI function {bdf}")
        return _state(self.root, bdf)

    def bind_stub(self, bdf: BDF) -> str | None:
        st = self._need(bdf)
        if st["driver"] == self.stub:
            return st.get("original")
        if (_dir(self.root, bdf) / REFUSES).exists():
            raise DriverError(19, f"{bdf}: the stub driver {self.stub} refused to bind it (probe failed); "
                                  f"it stays with {st['driver'] or 'no driver'}")
        _save(self.root, bdf, dict(st, driver=self.stub, original=st["driver"]))
        _maybe_vanish(self.root, "bind", bdf)
        return st["driver"]

    def unbind_stub(self, bdf: BDF, rebind: bool) -> None:
        st = self._need(bdf)
        _save(self.root, bdf, dict(st, driver=st.get("original") if rebind else None, original=None))

    def quarantine(self, bdf: BDF) -> str:
        _save(self.root, bdf, dict(self._need(bdf), quarantined=True))
        return f"{bdf} quarantined"

    def unquarantine(self, bdf: BDF) -> str:
        if self.exists(bdf):
            _save(self.root, bdf, dict(_state(self.root, bdf), quarantined=False))
        return f"{bdf} out of quarantine"

    def give(self, domid: int, bdf: BDF) -> list[str]:
        _maybe_vanish(self.root, "give", bdf)
        st = self._need(bdf)
        hook = self.root / KILL_ON_GIVE
        if hook.exists():
            hook.unlink()
            with XenStore() as xs:       # the daemon's environment names the simulated xenstored
                xs.rm(f"/local/domain/{domid}")
        _save(self.root, bdf, dict(st, assigned=domid))
        return [f"{bdf} assigned to dom{domid}"]

    def take(self, domid: int, bdf: BDF) -> list[str]:
        if self.exists(bdf):
            _save(self.root, bdf, dict(_state(self.root, bdf), assigned=None))
        return [f"{bdf} back in quarantine"]
