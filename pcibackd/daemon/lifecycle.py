"""An administrator's device lifecycle: the assignable pool, attach/detach/list, hide at start.

Served to pcibackctl through the control face (``face.lifecycle``).  Every
action checks everything first (function present, not dom0's, not another
guest's, domain alive) and undoes what it did when a later step fails, so the
pool and the guest stay consistent.  Nothing here waits: a hot-unplug writes
libxl's request and :meth:`Lifecycle.backends_changed` (called with the
domains each xenstore wake-up touched; it reads only the backends it follows)
finishes it once the guest let go.  Who holds a function is read from the
backend nodes, the toolstack's truth.

A function joining the pool is reset as xen-pciback resets what its stub
takes (:func:`pcibackd.daemon.releases.reset_at_seize`); one whose reset
failed (there, or at its last release) is quarantined and refused by
pci-attach until ``pcibackctl quarantine clear --force`` (or pci-attach --force).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pcibackd.common.files import write_atomic
from pcibackd.daemon.pool import LifecycleError, Pool, PoolOps  # noqa: F401 (LifecycleError: for the commands)
from pcibackd.daemon.pool import bad as _bad, failed as _failed, missing as _missing
from pcibackd.hostpci.drivers import DriverError, HostDrivers
from pcibackd.hostpci.records import clear_quarantine, quarantine, quarantined
from pcibackd.platform.hostdrivers import XenDrivers
from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import BACKEND_ROOT, backend_path
from pcibackd.wire.pciif import XenbusState as S
from pcibackd.xenstore.toolstack import Toolstack
from pcibackd.xl.pcispec import PciSpec, SpecError, parse_spec

MAX_DOMID = 0x7FEF
KERNEL_BACKEND = Path("/sys/module/xen_pciback")
CLOSING = (str(int(S.Closing)), str(int(S.Closed)))
DETACHING_FILE = "detaching.json"   # beside the pool: {domid: [functions our pci-detach marked]}
# backend states in which no device may be added (a reconfiguration in flight, or the end)
BUSY_STATES = {str(int(S.Reconfiguring)): "reconfiguring", str(int(S.Reconfigured)): "reconfiguring",
               str(int(S.Closing)): "closing", str(int(S.Closed)): "closed"}


@dataclass(frozen=True)
class Domain:
    domid: int
    name: str | None


class Lifecycle(PoolOps):
    """``platform`` opens a function for its reset at seize; ``release_dir`` holds the reset
    records and quarantines (the workers' ``<runtime>/state``)."""

    def __init__(self, xs, drivers: HostDrivers, pool: Pool, platform, release_dir: Path):
        self.xs, self.drivers, self.pool = xs, drivers, pool
        self.platform, self.release_dir = platform, Path(release_dir)
        self.toolstack = Toolstack(xs)
        # functions of the pool given to each guest (revoked when its backend goes)
        self.given: dict[int, set[BDF]] = {}
        # functions our pci-detach asked each guest to let go of; only those get libxl's last
        # step from us (an `xl pci-detach` or `xl destroy` does its own, and two renumberings
        # of one backend crash libxl).  Kept in a file so a restarted daemon finishes them.
        self.detaching_file = pool.path.parent / DETACHING_FILE
        self.detaching: dict[int, set[BDF]] = {}
        begun = _read_detaching(self.detaching_file)
        for domid in self._backends():
            listed = self._listed(domid)
            for bdf, state in listed:
                if bdf in pool:
                    self.given.setdefault(domid, set()).add(bdf)
                if state in CLOSING and bdf in begun.get(domid, ()):
                    self.detaching.setdefault(domid, set()).add(bdf)      # one an earlier daemon began
        self._save_detaching()

    def _backends(self) -> list[int]:
        return [int(d) for d in self.xs.ls(BACKEND_ROOT) if d.isdigit() and len(d) <= 5]

    def _listed(self, domid: int) -> list[tuple[BDF, str | None]]:
        """(function, its state-N) of every function named in ``domid``'s backend."""
        be, out = backend_path(domid), []
        for i in range(_count(self.xs.read(f"{be}/num_devs"))):
            try:
                out.append((BDF.parse(self.xs.read(f"{be}/dev-{i}") or ""), self.xs.read(f"{be}/state-{i}")))
            except ValueError:
                pass
        return out

    @classmethod
    def start(cls, xs, platform, cfg) -> "Lifecycle":
        """The daemon's: the pool under ``cfg.state_dir``, then ``[devices] hide`` applied."""
        # the simulated dom0 models drivers itself; a real dom0 has sysfs and Xen
        own = getattr(platform, "host_drivers", None)
        drivers = own(cfg.state_dir) if own is not None else XenDrivers(cfg.state_dir)
        if own is None and KERNEL_BACKEND.exists():
            logger.warning("xen_pciback is loaded: the kernel backend also serves PCI backends in xenstore; "
                           "blacklist it (see the README: Coexistence)")
        lifecycle = cls(xs, drivers, Pool(cfg.state_dir), platform, Path(cfg.runtime_dir) / "state")
        lifecycle.hide(cfg.hide)
        lifecycle.reclaim()
        return lifecycle

    # ------------------------------------------------------------ reading --
    def holders(self) -> dict[BDF, int]:
        """Every function named in a PCI backend, with its guest."""
        return {bdf: domid for domid in self._backends() for bdf, _ in self._listed(domid)}

    def domain(self, untrusted: str) -> Domain:
        """A domain by id or by name (``/local/domain/N/name``)."""
        if not isinstance(untrusted, str) or not untrusted:
            raise _bad("no domain given")
        if untrusted.isdigit() and len(untrusted) <= 5:
            domid = int(untrusted)
            name = self.xs.read(f"/local/domain/{domid}/name")
            if name is None and not self.xs.exists(f"/local/domain/{domid}"):
                raise _missing(f"no domain {domid}")
            return self._guest(Domain(domid, name))
        found = [int(d) for d in self.xs.ls("/local/domain")
                 if d.isdigit() and self.xs.read(f"/local/domain/{d}/name") == untrusted]
        if not found:
            raise _missing(f"no domain named {untrusted[:64]!r}")
        if len(found) > 1:
            raise _failed(f"{len(found)} domains are named {untrusted[:64]!r} ({', '.join(map(str, found))}): "
                          "give the domid")
        return self._guest(Domain(found[0], untrusted))

    @staticmethod
    def _guest(d: Domain) -> Domain:
        if not 0 < d.domid <= MAX_DOMID:
            raise _bad(f"domain {d.domid} is not a guest")
        return d

    def _functions(self, spec: PciSpec) -> list[BDF]:
        if spec.fn is not None:
            return [spec.bdf]
        found = [b for b in self.drivers.functions() if spec.matches(b)]
        if not found:
            raise _missing(f"no PCI function in slot {spec.slot_text}")
        return found

    def pci_list(self, untrusted_domain: str) -> dict:
        d = self.domain(untrusted_domain)
        be = backend_path(d.domid)
        rows = []
        for i in range(_count(self.xs.read(f"{be}/num_devs"))):
            node = {k: self.xs.read(f"{be}/{k}-{i}") for k in ("dev", "vdev", "vdevfn", "state", "opts", "name")}
            rows.append({"index": i, **node})
        return {"domid": d.domid, "name": d.name, "backend_state": self.xs.read(f"{be}/state"), "devices": rows}

    # ------------------------------------------------------------- guests --
    def attach(self, untrusted_domain: str, untrusted_spec: str, force: bool = False) -> dict:
        """``xl pci-attach``: all functions of the spec or none.  ``force``: a quarantined
        function too (its quarantine is cleared)."""
        try:
            spec = parse_spec(untrusted_spec)
        except SpecError as exc:
            raise _bad(f"PCI spec {untrusted_spec[:64]!r}: {exc}") from None
        d = self.domain(untrusted_domain)
        state = self.xs.read(f"{backend_path(d.domid)}/state")
        if state in BUSY_STATES:
            raise _failed(f"domain {d.domid}'s PCI backend is {BUSY_STATES[state]}; try again when it is not")
        bdfs = self._functions(spec)
        held = self.holders()
        for bdf in bdfs:
            if not self.drivers.exists(bdf):
                raise _missing(f"no PCI function {bdf} on this host")
            if bdf in held:
                who = "this domain" if held[bdf] == d.domid else f"domain {held[bdf]}"
                raise _failed(f"{bdf} is already assigned to {who}")
            if bdf not in self.pool and not spec.seize:
                raise _failed(f"{bdf} is not assignable: pcibackctl assignable-add {bdf} (or seize=1)")
        held_back = self._quarantined(bdfs, force)
        seized, given = [], []
        try:
            for bdf in bdfs:
                if bdf not in self.pool:
                    self.add(bdf, source="seize")
                    seized.append(bdf)
            for bdf in bdfs:
                if not self.drivers.exists(bdf):
                    raise _missing(f"PCI function {bdf} vanished during the attach")
                if bdf in seized and (why := quarantined(self.release_dir, bdf)) is not None:
                    if not force:
                        raise _failed(_quarantine_message(bdf, why))    # its reset at seize=1 failed
                    held_back.append(why)
                self.drivers.give(d.domid, bdf)
                given.append(bdf)
            for record in held_back:
                clear_quarantine(self.release_dir, BDF.parse(record.bdf))
                logger.warning("{}: quarantine cleared by pci-attach --force (domain {})", record.bdf, d.domid)
            hotplug = state == str(int(S.Connected))
            indices = self.toolstack.attach(d.domid, bdfs, opts=spec.opts, name=spec.name,
                                            vdevfn=None if spec.vslot is None else spec.vslot << 3,
                                            starting=not hotplug, wait=False, require_domain=True)
        except BaseException as exc:
            for record in held_back:
                quarantine(self.release_dir, record)         # as it was
            self._undo_attach(d.domid, given, seized)
            if isinstance(exc, LookupError):
                raise _failed(f"domain {d.domid} died during the attach of {', '.join(map(str, bdfs))}; "
                              "nothing was attached and the functions are back in the pool") from None
            if isinstance(exc, DriverError):
                raise _failed(f"attaching {', '.join(map(str, bdfs))} to domain {d.domid}: "
                              f"{exc.strerror or exc}; nothing was attached") from None
            raise
        self.given.setdefault(d.domid, set()).update(bdfs)
        logger.info("domain {}: attached {} ({})", d.domid, ", ".join(map(str, bdfs)),
                    "hot-plug" if hotplug else "before the guest connects")
        return {"domid": d.domid, "name": d.name, "functions": [str(b) for b in bdfs], "indices": indices,
                "hotplug": hotplug}

    def _quarantined(self, bdfs: list[BDF], force: bool) -> list:
        """The quarantine records of ``bdfs`` (cleared by the attach); refused without ``force``."""
        found = [(bdf, why) for bdf in bdfs if (why := quarantined(self.release_dir, bdf)) is not None]
        if found and not force:
            raise _failed(_quarantine_message(*found[0]))
        return [why for _, why in found]

    def _undo_attach(self, domid: int, given: list[BDF], seized: list[BDF]) -> None:
        for bdf in given:
            try:
                self.drivers.take(domid, bdf)
            except DriverError as exc:
                logger.error("undoing the attach of {}: {}", bdf, exc.strerror or exc)
        for bdf in seized:
            self.pool.remove(bdf)
            self._unseize(bdf, rebind=True)

    def detach(self, untrusted_domain: str, untrusted_spec: str, force: bool) -> dict:
        """``xl pci-detach``: ask the guest to let go (finished in :meth:`backends_changed`);
        ``force``, or a guest whose frontend never connected: remove at once."""
        try:
            spec = parse_spec(untrusted_spec)
        except SpecError as exc:
            raise _bad(f"PCI spec {untrusted_spec[:64]!r}: {exc}") from None
        d = self.domain(untrusted_domain)
        held = self.holders()
        bdfs = [b for b, domid in held.items() if domid == d.domid and spec.matches(b)]
        if not bdfs:
            raise _missing(f"{spec} is not attached to domain {d.domid}")
        connected = self.xs.read(f"{backend_path(d.domid)}/state") == str(int(S.Connected))
        for bdf in sorted(bdfs):
            if force or not connected:
                self.toolstack.remove_nodes(d.domid, bdf)
                self._revoke(d.domid, bdf)
            else:
                self.detaching.setdefault(d.domid, set()).add(bdf)
                self._save_detaching()
                self.toolstack.begin_detach(d.domid, bdf)
        return {"domid": d.domid, "functions": [str(b) for b in sorted(bdfs)],
                "state": "detaching" if connected and not force else "detached"}

    def _revoke(self, domid: int, bdf: BDF) -> None:
        given = self.given.get(domid, set())
        if bdf in given:
            given.discard(bdf)
            try:
                self.drivers.take(domid, bdf)
            except DriverError as exc:
                logger.error("domain {}: revoking {}: {}", domid, bdf, exc.strerror or exc)
            logger.info("domain {}: {} is back in the pool", domid, bdf)

    def followed(self, domids) -> set[int]:
        """Those of ``domids`` whose backend changes concern us: a function of the pool is given
        to it, or a detach is under way there.  Only their backends are read again."""
        return (set(self.given) | set(self.detaching)) & set(domids)

    def wants_events(self, domids) -> bool:
        return bool(self.followed(domids))

    def backends_changed(self, domids) -> None:
        """Finish the hot-unplugs the guests of ``domids`` completed; take back what their gone
        backends held.  Never raises: it runs in the supervisor's loop."""
        for domid in sorted(self.followed(domids)):
            try:
                self._backend_changed(domid)
            except Exception as exc:        # xenstore trouble must not stop the supervisor
                logger.exception("device lifecycle, domain {}: {}", domid, exc)

    def _backend_changed(self, domid: int) -> None:
        # A function our pci-detach marked Closing, in a backend that is Connected again, was
        # let go by the guest (the mark and state=7 are written together): libxl's last step
        # is ours.  Marks we did not write are libxl's, and so is that step.
        listed = self._listed(domid)
        ours = self.detaching.get(domid, set())
        if ours and self.xs.read(f"{backend_path(domid)}/state") == str(int(S.Connected)):
            for bdf, state in listed:
                if state in CLOSING and bdf in ours:
                    self.toolstack.remove_nodes(domid, bdf)
                    self._revoke(domid, bdf)
            listed = self._listed(domid)
        pending = {bdf for bdf, state in listed if state in CLOSING} & ours
        if pending != ours:
            if pending:
                self.detaching[domid] = pending
            else:
                self.detaching.pop(domid, None)
            self._save_detaching()
        held = {bdf for bdf, _ in listed}
        for bdf in sorted(self.given.get(domid, ())):
            if bdf not in held:
                self._revoke(domid, bdf)
        if not self.given.get(domid, True):
            del self.given[domid]


    def _save_detaching(self) -> None:
        try:
            write_atomic(self.detaching_file, json.dumps(
                {str(d): sorted(map(str, bdfs)) for d, bdfs in self.detaching.items()}).encode())
        except OSError as exc:
            logger.error("{}: {} (a restarted daemon will not finish these detaches)", self.detaching_file, exc)


def _read_detaching(path: Path) -> dict[int, set[BDF]]:
    """The detaches an earlier daemon began (an unreadable file: none)."""
    try:
        untrusted = json.loads(path.read_text())
        return {int(d): {BDF.parse(b) for b in bdfs} for d, bdfs in untrusted.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("{} unreadable ({}): no pending detach taken over", path, exc)
        return {}


def _quarantine_message(bdf: BDF, why) -> str:
    return (f"{bdf} is quarantined: its last reset failed ({why.describe()}); "
            f"'pcibackctl quarantine clear --force {bdf}' hands it out again (or pci-attach --force)")


def _count(untrusted: str | None) -> int:
    try:
        return max(0, min(int(untrusted or "0"), 256))
    except ValueError:
        return 0
