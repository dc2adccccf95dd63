"""The assignable pool: host functions set aside for guests, persisted across daemon restarts.

``<state_dir>/pool.json`` holds each function's original dom0 driver (to give
it back with ``assignable-remove -r``), its optional name and how it joined
(``hide`` at start, ``add`` by command, ``seize`` by an attach).  Written
atomically after every change, so a crash leaves the old or the new pool.

:class:`PoolOps` are the commands on it: a function joining is unbound from its
dom0 driver, bound to the stub, reset and restored as xen-pciback does when its
stub takes a device (a failed reset quarantines it), then quarantined in Xen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from pcibackd.common.files import write_atomic
from pcibackd.daemon.releases import reset_at_seize
from pcibackd.hostpci.drivers import DriverError, HostDrivers
from pcibackd.hostpci.records import clear_quarantine
from pcibackd.wire.bdf import BDF
from pcibackd.xl.pcispec import SpecError, parse_pattern

POOL_FILE = "pool.json"
VERSION = 1


@dataclass(frozen=True)
class Member:
    bdf: BDF
    driver: str | None          # the dom0 driver it had before (None: none)
    name: str | None = None
    source: str = "add"         # "hide" | "add" | "seize"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bdf"] = str(self.bdf)
        return d


class Pool:
    """Members by BDF; :meth:`add` and :meth:`remove` persist at once."""

    def __init__(self, state_dir: Path | str):
        self.path = Path(state_dir) / POOL_FILE
        self.members: dict[BDF, Member] = {}
        self._load()

    def _load(self) -> None:
        try:
            untrusted = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.error("assignable pool {} unreadable ({}): starting with an empty pool", self.path, exc)
            return
        for entry in untrusted.get("functions", []) if isinstance(untrusted, dict) else []:
            try:
                m = Member(BDF.parse(entry["bdf"]), entry.get("driver"), entry.get("name"),
                           entry.get("source", "add"))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.warning("assignable pool {}: bad entry {!r} skipped", self.path, str(entry)[:80])
                continue
            self.members[m.bdf] = m

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"version": VERSION, "functions": [m.to_dict() for m in sorted(self.members.values(),
                                                                                 key=lambda m: m.bdf)]}
        write_atomic(self.path, json.dumps(data, indent=1).encode())

    def __contains__(self, bdf: BDF) -> bool:
        return bdf in self.members

    def get(self, bdf: BDF) -> Member | None:
        return self.members.get(bdf)

    def by_name(self, name: str) -> Member | None:
        return next((m for m in self.members.values() if m.name == name), None)

    def add(self, member: Member) -> None:
        self.members[member.bdf] = member
        self._save()

    def remove(self, bdf: BDF) -> Member | None:
        m = self.members.pop(bdf, None)
        if m is not None:
            self._save()
        return m

    def sorted(self) -> list[Member]:
        return [self.members[b] for b in sorted(self.members)]


class LifecycleError(Exception):
    """``kind``: "bad" (the request), "not_found" (no such function/domain), "failed" (refused or broke)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def bad(msg: str) -> LifecycleError:
    return LifecycleError("bad", msg)


def missing(msg: str) -> LifecycleError:
    return LifecycleError("not_found", msg)


def failed(msg: str) -> LifecycleError:
    return LifecycleError("failed", msg)


class PoolOps:
    """The pool's commands (assignable-add/-remove/-list, ``[devices] hide``), mixed into
    :class:`pcibackd.daemon.lifecycle.Lifecycle`, which provides who holds what."""

    pool: Pool
    drivers: HostDrivers
    given: dict[int, set[BDF]]
    platform: object            # opens a function for its reset at seize
    release_dir: Path           # reset records and quarantines

    def list_pool(self) -> list[dict]:
        held = self.holders()
        return [{"bdf": str(m.bdf), "name": m.name, "driver": m.driver, "source": m.source,
                 "bound": self.drivers.driver(m.bdf) if self.drivers.exists(m.bdf) else None,
                 "present": self.drivers.exists(m.bdf), "held_by": held.get(m.bdf)}
                for m in self.pool.sorted()]

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
            raise missing(f"no PCI function {bdf} on this host")
        known = self.pool.get(bdf)
        if name and (other := self.pool.by_name(name)) is not None and other.bdf != bdf:
            raise failed(f"the name {name!r} is already used by {other.bdf}")
        if known is not None:
            if self.drivers.driver(bdf) != self.drivers.stub and bdf not in self.holders():
                self._seize(bdf, force)       # someone rebound it behind our back: take it again
            if name and name != known.name:
                self.pool.add(Member(bdf, known.driver, name, known.source))
            return {"bdf": str(bdf), "note": "already assignable"}
        holder = self.holders().get(bdf)
        if holder is not None:
            raise failed(f"{bdf} is attached to domain {holder} outside the pool: detach it first")
        original, reset = self._seize(bdf, force)
        try:
            self.pool.add(Member(bdf, original, name or None, source))
        except OSError as exc:
            self._unseize(bdf, rebind=True)
            raise failed(f"{bdf}: cannot save the pool ({exc}); left with {original or 'no driver'}") from None
        return {"bdf": str(bdf), "note": f"was bound to {original or 'no driver'}; {reset}"}

    def _seize(self, bdf: BDF, force: bool) -> tuple[str | None, str]:
        """Stub-bound, reset, quarantined in Xen: (its original driver, how the reset went)."""
        reason = self.drivers.in_use(bdf)
        if reason and not force:
            raise failed(f"{bdf} is in use by dom0: {reason}; refusing (--force takes it anyway)")
        try:
            original = self.drivers.bind_stub(bdf)
        except DriverError as exc:
            raise failed(str(exc.strerror or exc)) from None
        # no dom0 driver has it now; a failed reset keeps it in the pool, quarantined
        record = None if not self.drivers.exists(bdf) else reset_at_seize(self.platform, self.release_dir, bdf)
        if not self.drivers.exists(bdf):
            if record is not None and not record.reset_ok:
                clear_quarantine(self.release_dir, bdf)     # about a function no longer here
            raise missing(f"PCI function {bdf} vanished while it was taken from dom0 (surprise removal); "
                          "it is not in the pool")
        reset = (record.describe().removeprefix("at seize: ") if record.reset_ok else
                 f"its reset failed ({record.detail}): quarantined, "
                 f"'pcibackctl quarantine clear --force {bdf}' hands it out")
        try:
            logger.info("{}", self.drivers.quarantine(bdf))
        except DriverError as exc:
            self._unseize(bdf, rebind=True)
            raise failed(f"{bdf}: quarantine failed ({exc.strerror or exc}); given back to dom0") from None
        return original, reset

    def _unseize(self, bdf: BDF, rebind: bool) -> None:
        try:
            self.drivers.unquarantine(bdf)
            self.drivers.unbind_stub(bdf, rebind)
        except DriverError as exc:
            logger.error("undoing {}: {}", bdf, exc.strerror or exc)

    def remove(self, bdf: BDF, rebind: bool) -> dict:
        member = self.pool.get(bdf)
        if member is None:
            raise missing(f"{bdf} is not in the assignable pool")
        holder = self.holders().get(bdf)
        if holder is not None:
            raise failed(f"{bdf} is attached to domain {holder}: pci-detach it first")
        for domid in [d for d, bdfs in self.given.items() if bdf in bdfs]:
            self._revoke(domid, bdf)        # its guest went and we had not noticed yet
        note = "gone from the host" if not self.drivers.exists(bdf) else \
            f"rebound to {member.driver}" if rebind and member.driver else "left without a driver"
        if self.drivers.exists(bdf):
            try:
                self.drivers.unquarantine(bdf)
                self.drivers.unbind_stub(bdf, rebind)
            except DriverError as exc:
                raise failed(f"{bdf}: {exc.strerror or exc}; it stays in the pool") from None
        self.pool.remove(bdf)
        return {"bdf": str(bdf), "note": note}
