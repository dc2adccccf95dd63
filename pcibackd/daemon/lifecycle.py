"""An administrator's device lifecycle: the assignable pool, attach/detach/list, hide at start.

Served to pcibackctl through the control face (``face.lifecycle``).  Every
action checks everything first (function present, not dom0's, not another
guest's, domain alive) and undoes what it did when a later step fails, so the
pool and the guest stay consistent.  Nothing here waits: a hot-unplug writes
libxl's request and :meth:`Lifecycle.backends_changed` (called on each
xenstore wake-up) finishes it once the guest let go.  Who holds a function is
read from the backend nodes, the toolstack's truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pcibackd.daemon.pool import Member, Pool
from pcibackd.hostpci.drivers import DriverError, HostDrivers
from pcibackd.platform.hostdrivers import XenDrivers
from pcibackd.wire.bdf import BDF
from pcibackd.wire.paths import BACKEND_ROOT, backend_path
from pcibackd.wire.pciif import XenbusState as S
from pcibackd.xenstore.toolstack import Toolstack
from pcibackd.xl.pcispec import PciSpec, SpecError, parse_pattern, parse_spec

MAX_DOMID = 0x7FEF
KERNEL_BACKEND = Path("/sys/module/xen_pciback")
CLOSING = (str(int(S.Closing)), str(int(S.Closed)))
# backend states in which no device may be added (a reconfiguration in flight, or the end)
BUSY_STATES = {str(int(S.Reconfiguring)): "reconfiguring", str(int(S.Reconfigured)): "reconfiguring",
               str(int(S.Closing)): "closing", str(int(S.Closed)): "closed"}


class LifecycleError(Exception):
    """``kind``: "bad" (the request), "not_found" (no such function/domain), "failed" (refused or broke)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _bad(msg: str) -> LifecycleError:
    return LifecycleError("bad", msg)


def _missing(msg: str) -> LifecycleError:
    return LifecycleError("not_found", msg)


def _failed(msg: str) -> LifecycleError:
    return LifecycleError("failed", msg)


@dataclass(frozen=True)
class Domain:
    domid: int
    name: str | None


class Lifecycle:
    def __init__(self, xs, drivers: HostDrivers, pool: Pool):
        self.xs, self.drivers, self.pool = xs, drivers, pool
        self.toolstack = Toolstack(xs)
        # functions of the pool given to each guest (revoked when its backend goes)
        self.given: dict[int, set[BDF]] = {}
        self.detaching: set[int] = set()        # domains asked to let go of a function (pci-detach)
        for bdf, domid in self.holders().items():
            if bdf in pool:
                self.given.setdefault(domid, set()).add(bdf)

    def _unplugged(self) -> list[tuple[int, BDF]]:
        done = []
        for untrusted in self.xs.ls(BACKEND_ROOT):
            if not untrusted.isdigit() or len(untrusted) > 5:
                continue
            be = backend_path(int(untrusted))
            if self.xs.read(f"{be}/state") != str(int(S.Connected)):
                continue
            for i in range(_count(self.xs.read(f"{be}/num_devs"))):
                if self.xs.read(f"{be}/state-{i}") in CLOSING:
                    try:
                        done.append((int(untrusted), BDF.parse(self.xs.read(f"{be}/dev-{i}") or "")))
                    except ValueError:
                        pass
        return done

    @classmethod
    def start(cls, xs, platform, cfg) -> "Lifecycle":
        """The daemon's: the pool under ``cfg.state_dir``, then ``[devices] hide`` applied."""
        # the simulated dom0 models drivers itself; a real dom0 has sysfs and Xen
        own = getattr(platform, "host_drivers", None)
        drivers = own(cfg.state_dir) if own is not None else XenDrivers(cfg.state_dir)
        if own is None and KERNEL_BACKEND.exists():
            logger.warning("xen_pciback is loaded: the kernel backend also serves PCI backends in xenstore; "
                           "blacklist it (see the README: Coexistence)")
        lifecycle = cls(xs, drivers, Pool(cfg.state_dir))
        lifecycle.hide(cfg.hide)
        lifecycle.reclaim()
        return lifecycle

    # ------------------------------------------------------------ reading --
    def holders(self) -> dict[BDF, int]:
        """Every function named in a PCI backend, with its guest."""
        held = {}
        for untrusted in self.xs.ls(BACKEND_ROOT):
            if not untrusted.isdigit() or len(untrusted) > 5:
                continue
            be = backend_path(int(untrusted))
            for i in range(_count(self.xs.read(f"{be}/num_devs"))):
                try:
                    held[BDF.parse(self.xs.read(f"{be}/dev-{i}") or "")] = int(untrusted)
                except ValueError:
                    pass
        return held

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

    def list_pool(self) -> list[dict]:
        held = self.holders()
        return [{"bdf": str(m.bdf), "name": m.name, "driver": m.driver, "source": m.source,
                 "bound": self.drivers.driver(m.bdf) if self.drivers.exists(m.bdf) else None,
                 "present": self.drivers.exists(m.bdf), "held_by": held.get(m.bdf)}
                for m in self.pool.sorted()]

    def pci_list(self, untrusted_domain: str) -> dict:
        d = self.domain(untrusted_domain)
        be = backend_path(d.domid)
        rows = []
        for i in range(_count(self.xs.read(f"{be}/num_devs"))):
            node = {k: self.xs.read(f"{be}/{k}-{i}") for k in ("dev", "vdev", "vdevfn", "state", "opts", "name")}
            rows.append({"index": i, **node})
        return {"domid": d.domid, "name": d.name, "backend_state": self.xs.read(f"{be}/state"), "devices": rows}

    # --------------------------------------------------------------- pool --
    def hide(self, patterns: tuple[str, ...] | list[str]) -> None:
        """``[devices] hide`` at start, before any guest: make each function assignable; log, never raise."""
        for pattern in patterns:
            try:
                bdfs = self._functions(parse_pattern(pattern))
            except (SpecError, LifecycleError) as exc:
                logger.error("[devices] hide {!r}: {}", pattern, exc)
                continue
            for bdf in bdfs:
                try:
                    result = self.add(bdf, source="hide")
                    logger.info("hidden from dom0: {} ({})", bdf, result["note"])
                except LifecycleError as exc:
                    logger.error("[devices] hide {}: {}", bdf, exc.message)

    def reclaim(self) -> None:
        """At start: a pool member back with a dom0 driver (the host rebooted) is taken again."""
        for m in self.pool.sorted():
            if self.drivers.exists(m.bdf) and self.drivers.driver(m.bdf) == self.drivers.stub:
                continue
            try:
                self.add(m.bdf)
                logger.info("assignable pool: {} taken from dom0 again", m.bdf)
            except LifecycleError as exc:
                logger.error("assignable pool: {}", exc.message)

    def add(self, bdf: BDF, name: str | None = None, force: bool = False, source: str = "add") -> dict:
        """Make ``bdf`` assignable: stub driver, quarantine, persisted with its original driver."""
        if not self.drivers.exists(bdf):
            raise _missing(f"no PCI function {bdf} on this host")
        known = self.pool.get(bdf)
        if name and (other := self.pool.by_name(name)) is not None and other.bdf != bdf:
            raise _failed(f"the name {name!r} is already used by {other.bdf}")
        if known is not None:
            if self.drivers.driver(bdf) != self.drivers.stub and bdf not in self.holders():
                self._seize(bdf, force)       # someone rebound it behind our back: take it again
            if name and name != known.name:
                self.pool.add(Member(bdf, known.driver, name, known.source))
            return {"bdf": str(bdf), "note": "already assignable"}
        holder = self.holders().get(bdf)
        if holder is not None:
            raise _failed(f"{bdf} is attached to domain {holder} outside the pool: detach it first")
        original = self._seize(bdf, force)
        try:
            self.pool.add(Member(bdf, original, name or None, source))
        except OSError as exc:
            self._unseize(bdf, rebind=True)
            raise _failed(f"{bdf}: cannot save the pool ({exc}); left with {original or 'no driver'}") from None
        return {"bdf": str(bdf), "note": f"was bound to {original or 'no driver'}"}

    def _seize(self, bdf: BDF, force: bool) -> str | None:
        reason = self.drivers.in_use(bdf)
        if reason and not force:
            raise _failed(f"{bdf} is in use by dom0: {reason}; refusing (--force takes it anyway)")
        try:
            original = self.drivers.bind_stub(bdf)
        except DriverError as exc:
            raise _failed(str(exc.strerror or exc)) from None
        try:
            logger.info("{}", self.drivers.quarantine(bdf))
        except DriverError as exc:
            self._unseize(bdf, rebind=True)
            raise _failed(f"{bdf}: quarantine failed ({exc.strerror or exc}); given back to dom0") from None
        return original

    def _unseize(self, bdf: BDF, rebind: bool) -> None:
        try:
            self.drivers.unquarantine(bdf)
            self.drivers.unbind_stub(bdf, rebind)
        except DriverError as exc:
            logger.error("undoing {}: {}", bdf, exc.strerror or exc)

    def remove(self, bdf: BDF, rebind: bool) -> dict:
        member = self.pool.get(bdf)
        if member is None:
            raise _missing(f"{bdf} is not in the assignable pool")
        holder = self.holders().get(bdf)
        if holder is not None:
            raise _failed(f"{bdf} is attached to domain {holder}: pci-detach it first")
        note = "gone from the host" if not self.drivers.exists(bdf) else \
            f"rebound to {member.driver}" if rebind and member.driver else "left without a driver"
        if self.drivers.exists(bdf):
            try:
                self.drivers.unquarantine(bdf)
                self.drivers.unbind_stub(bdf, rebind)
            except DriverError as exc:
                raise _failed(f"{bdf}: {exc.strerror or exc}; it stays in the pool") from None
        self.pool.remove(bdf)
        return {"bdf": str(bdf), "note": note}

    # ------------------------------------------------------------- guests --
    def attach(self, untrusted_domain: str, untrusted_spec: str) -> dict:
        """``xl pci-attach``: all functions of the spec or none."""
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
        seized, given = [], []
        try:
            for bdf in bdfs:
                if bdf not in self.pool:
                    self.add(bdf, source="seize")
                    seized.append(bdf)
            for bdf in bdfs:
                if not self.drivers.exists(bdf):
                    raise _missing(f"PCI function {bdf} vanished during the attach")
                self.drivers.give(d.domid, bdf)
                given.append(bdf)
            hotplug = state == str(int(S.Connected))
            indices = self.toolstack.attach(d.domid, bdfs, opts=spec.opts, name=spec.name,
                                            vdevfn=None if spec.vslot is None else spec.vslot << 3,
                                            starting=not hotplug, wait=False, require_domain=True)
        except BaseException as exc:
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
                self.toolstack.begin_detach(d.domid, bdf)
                self.detaching.add(d.domid)
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

    def wants_events(self) -> bool:
        """Whether backend changes concern us: a function of the pool is given, or a detach is under way
        (the check reads every backend, so the supervisor skips it otherwise)."""
        return bool(self.given or self.detaching)

    def backends_changed(self) -> None:
        """Finish hot-unplugs the guest completed; take back what gone backends held.
        Never raises: it runs in the supervisor's loop."""
        try:
            self._backends_changed()
        except Exception as exc:        # xenstore trouble must not stop the supervisor
            logger.exception("device lifecycle: {}", exc)

    def _backends_changed(self) -> None:
        # A function marked Closing in a backend that is Connected again was let go by the
        # guest (the mark and state=7 are written together): libxl's last step is ours.
        # Read from xenstore, not remembered, so a restarted daemon finishes it too.
        for domid, bdf in self._unplugged():
            self.toolstack.remove_nodes(domid, bdf)
            self._revoke(domid, bdf)
            self.detaching.discard(domid)
        held = self.holders()
        self.detaching &= set(held.values())
        for domid in list(self.given):
            for bdf in sorted(self.given[domid]):
                if held.get(bdf) != domid:
                    self._revoke(domid, bdf)
            if not self.given[domid]:
                del self.given[domid]


def _count(untrusted: str | None) -> int:
    try:
        return max(0, min(int(untrusted or "0"), 256))
    except ValueError:
        return 0
