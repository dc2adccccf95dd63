"""The interrupt broker's core: checks each request, keeps the live PIRQs, performs the effects.

It runs in the supervisor, one request at a time.  Hypercalls and dom0
config-space writes go through the injected :class:`Physdev`; the record of
live PIRQs through the injected :class:`JournalStore`, written twice per
map whatever its vector count: an intent before the first hypercall and a
commit with every PIRQ before the answer.  A crash at any point leaves a
record that is complete (the guest was, or is about to be, answered) or an
intent whose PIRQs are unknown: replay turns that function's controls off
and refuses it further maps until its guest goes (Xen frees the PIRQs then).

Sequences (docs/interrupts.md, in Linux's order):

==========  ===================================================================
map MSI     ctrl &= ~ENABLE; map_pirq; COMMAND |= INTX_DISABLE (not on a VF); ctrl |= ENABLE
map MSI-X   ctrl |= ENABLE|MASKALL; map_pirq per entry; COMMAND |= INTX_DISABLE (not on
            a VF); ctrl &= ~MASKALL
unmap       ctrl &= ~ENABLE (MSI-X: and MASKALL); COMMAND &= ~INTX_DISABLE;
            unmap_pirq each (ESRCH/EINVAL/ENOENT: already gone)
prepare     MSI-X functions only: MEMORY on for the call, prepare_msix, COMMAND back
release     nothing mapped any more: release_msix
==========  ===================================================================

Control words are written exactly 2 bytes wide at cap+2 and COMMAND at 0x04,
the only accesses Xen's intercept lets through; it drops others silently, so
every write is read back.  A failed map is undone before the answer.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import Callable

from pcibackd.irq.function import FunctionRecord, Kind, control_offset, find_capability
from pcibackd.wire.pciregs import CAP_MSI, CAP_MSIX, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEM, MSIX_ENABLE, MSIX_MASKALL, MSI_ENABLE
from pcibackd.irq.messages import (PIRQ_MAX, VECTOR_MAX, Answer, Failed, Leave, MapMsi, MapMsix, Mapping,
                                   Query, Unmap, refused)
from pcibackd.irq.ports import JournalStore, Physdev, PhysdevError, ReplayReport
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import SH_INFO_MAX_VEC

GONE = frozenset({errno.ESRCH, errno.EINVAL, errno.ENOENT})   # unmap of a PIRQ Xen no longer has
ENABLE_BITS = {Kind.msi: MSI_ENABLE, Kind.msix: MSIX_ENABLE | MSIX_MASKALL}


class ReadbackError(OSError):
    """A control-register write did not take (Xen dropped it, or the device refused)."""


class JournalError(OSError):
    """The journal could not be written (always EIO to the guest, whatever the disk said)."""


@dataclass(frozen=True)
class Limits:
    max_vectors: int = SH_INFO_MAX_VEC        # per function
    max_pirqs_per_domain: int = 512



class Broker:
    """See module doc.  Supervisor-side methods trust their caller; :meth:`handle` does not."""

    def __init__(self, physdev: Physdev, journal: JournalStore, limits: Limits = Limits()) -> None:
        self.physdev, self.journal, self.limits = physdev, journal, limits
        self.records: dict[BDF, FunctionRecord] = {}
        self.owner: dict[BDF, int] = {}
        self.live: dict[BDF, Mapping] = {}
        self.prepared: set[BDF] = set()
        self.prepared_unknown = False
        self.damaged_domains: set[int] = set()

    # -- supervisor ----------------------------------------------------------

    def assign(self, domid: int, record: FunctionRecord) -> Answer:
        """``record.bdf`` now belongs to ``domid`` (after xc_assign_device).

        Refused while another guest owns the function: only that owner's
        :meth:`unassign` or :meth:`domain_gone` lets it go.  What another guest
        left mapped without owning it any more (a failed unassign) is torn down.
        """
        bdf = record.bdf
        holder = self.owner.get(bdf)
        if holder is not None and holder != domid:
            return refused(errno.EBUSY, "owned", f"{bdf} is dom{holder}'s")
        stale = self.live.get(bdf)
        self.records[bdf] = record
        if stale is not None and stale.domid != domid:
            self._tear_down(stale)
        self.owner[bdf] = domid
        return Answer()

    def unassign(self, bdf: BDF) -> Answer:
        """Controls off, every PIRQ of ``bdf`` unmapped, then not the guest's: before any reset."""
        m = self.live.get(bdf)
        left = self._tear_down(m) if m else None
        self.owner.pop(bdf, None)
        if left:
            return refused(errno.EBUSY, "unmap_failed", f"PIRQs {list(left.pirqs)} still mapped")
        return Answer()

    def domain_gone(self, domid: int) -> Answer:
        """Xen freed the guest's PIRQs with it: turn controls off and forget it all."""
        for m in [m for m in self.live.values() if m.domid == domid]:
            self._disable(m.bdf, m.kind)
            self._unmap_pirqs(m.domid, m.entries, m.pirqs)    # ESRCH expected; harmless
            self.live.pop(m.bdf)
        for bdf in [b for b, d in self.owner.items() if d == domid]:
            del self.owner[bdf]
        self.damaged_domains.discard(domid)
        try:
            self.journal.forget(domid)
        except OSError as exc:
            return refused(errno.EIO, "journal", f"dom{domid}'s journal not removed: {exc}")
        return Answer()

    def prepare(self, record: FunctionRecord) -> Answer:
        """PHYSDEVOP_prepare_msix at seize; refused for functions without MSI-X (Xen would crash)."""
        self.records[record.bdf] = record
        if not record.has_msix:
            return refused(errno.EINVAL, "no_capability", "no MSI-X capability or table BAR")
        if record.bdf in self.prepared:
            return Answer()
        bdf = record.bdf
        try:
            self._with_memory_decoding(bdf, self.physdev.prepare_msix)
        except OSError as exc:
            # EBUSY means "prepared already": ours only if the journal says so (or was lost).
            if not (exc.errno == errno.EBUSY and self.prepared_unknown):
                return _failed(exc)
        self.prepared.add(bdf)
        return self._save_prepared()

    def release(self, bdf: BDF) -> Answer:
        """PHYSDEVOP_release_msix before the function returns to dom0."""
        if bdf in self.live:
            return refused(errno.EBUSY, "still_mapped", "unassign first")
        if bdf not in self.prepared:
            return Answer()
        try:
            self.physdev.release_msix(bdf)
        except OSError as exc:
            return _failed(exc)
        self.prepared.discard(bdf)
        return self._save_prepared()

    def _save_prepared(self) -> Answer:
        """Xen's state changed whatever the disk says: keep it in memory, report a failed write."""
        try:
            self.journal.save_prepared(self.prepared)
        except OSError as exc:
            return refused(errno.EIO, "journal", f"prepared functions not journaled: {exc}")
        return Answer()

    def _with_memory_decoding(self, bdf: BDF, call: Callable[[BDF], None]) -> None:
        """Xen reads the MSI-X table BAR only with MEMORY decoding on: turn it on for the call."""
        command = self.physdev.read_config(bdf, COMMAND, 2)
        if command & COMMAND_MEM:
            call(bdf)
            return
        self.physdev.write_config(bdf, COMMAND, 2, command | COMMAND_MEM)
        try:
            call(bdf)
        finally:
            self.physdev.write_config(bdf, COMMAND, 2, command)

    def replay(self, alive: Callable[[int], bool]) -> ReplayReport:
        """Load the journal at start: adopt what live guests hold, unmap the rest."""
        rec = self.journal.load()
        report = ReplayReport(problems=list(rec.problems))
        self.prepared, self.prepared_unknown = set(rec.prepared), rec.prepared_damaged
        for domid in sorted(rec.damaged_domains):
            if alive(domid):
                self.damaged_domains.add(domid)
                report.damaged_domains.append(domid)
            else:
                self.journal.forget(domid)
        for domid, maps in sorted(rec.mappings.items()):
            if not alive(domid):
                for m in maps:
                    self._disable(m.bdf, m.kind)
                    self._unmap_pirqs(domid, m.entries, m.pirqs)   # Xen freed them: ESRCH
                report.torn_down += maps
                self.journal.forget(domid)
                continue
            for m in maps:
                if m.bdf in self.live:
                    # One function, one guest: the second record cannot be current.
                    report.problems.append(f"{m.bdf} journaled for dom{self.live[m.bdf].domid} and dom{domid}")
                    self._unmap_pirqs(domid, m.entries, m.pirqs)
                elif m.held:
                    self.live[m.bdf] = m
                    report.adopted.append(m)
                else:
                    left = self._tear_down(m)
                    if left and not left.complete:
                        report.uncertain.append(m.bdf)
                    elif left:
                        report.orphans.append(left)
            self._save(domid)
        return report

    # -- worker requests -----------------------------------------------------

    def handle(self, sender: int, request: object) -> Answer:
        """Serve a request from the worker of guest ``sender``."""
        handler = _HANDLERS.get(type(request))
        if handler is None:
            return refused(errno.EPERM, "not_allowed", type(request).__name__)
        domid, bdf = getattr(request, "domid"), getattr(request, "bdf")
        if domid != sender:
            return refused(errno.EPERM, "wrong_domain", f"dom{sender} asked for dom{domid}")
        if self.owner.get(bdf) != sender:
            return refused(errno.ENODEV, "not_assigned", f"{bdf} is not dom{sender}'s")
        return handler(self, request)

    def _check_free(self, domid: int, bdf: BDF, kind: Kind, count: int) -> Answer | None:
        if domid in self.damaged_domains:
            return refused(errno.EBUSY, "journal_damaged", f"dom{domid}'s journal was unreadable")
        m = self.live.get(bdf)
        if m is not None:
            if not m.held:
                return refused(errno.EBUSY, "uncertain", f"{bdf} may still have PIRQs mapped")
            if m.kind is kind:
                return refused(errno.EALREADY, "already_mapped", f"{kind.value} already mapped")
            return refused(errno.EBUSY, "other_kind_mapped", f"{m.kind.value} is mapped")
        used = sum(len(x.entries) for x in self.live.values() if x.domid == domid)
        if used + count > self.limits.max_pirqs_per_domain:
            return refused(errno.ENOSPC, "limit", f"dom{domid} would hold {used + count} PIRQs")
        return None

    def _map_msi(self, req: MapMsi) -> Answer:
        rec = self.records[req.bdf]
        if rec.msi_cap is None:
            return refused(errno.EINVAL, "no_capability", "no MSI capability")
        if req.nvec != 1:
            return refused(errno.EOPNOTSUPP, "multi_msi", "multi-message MSI is not supported")
        return self._check_free(req.domid, req.bdf, Kind.msi, 1) or self._map(req.domid, rec, Kind.msi, (0,))

    def _map_msix(self, req: MapMsix) -> Answer:
        rec, entries = self.records[req.bdf], req.entries
        if not rec.has_msix:
            return refused(errno.EINVAL, "no_capability", "no MSI-X capability or table BAR")
        if not 0 < len(entries) <= self.limits.max_vectors:
            return refused(errno.EINVAL, "count", f"{len(entries)} vectors")
        if len(entries) > rec.msix_entries:
            return refused(errno.ENOSPC, "count", f"{len(entries)} vectors, table has {rec.msix_entries}")
        if any(not 0 <= e < rec.msix_entries for e in entries):
            return refused(errno.EINVAL, "bad_entry", f"entry outside the table of {rec.msix_entries}")
        if len(set(entries)) != len(entries):
            return refused(errno.EINVAL, "duplicate_entry", "an entry is listed twice")
        if req.bdf not in self.prepared:
            return refused(errno.ENODATA, "not_prepared", "PHYSDEVOP_prepare_msix was not done")
        return self._check_free(req.domid, req.bdf, Kind.msix, len(entries)) or \
            self._map(req.domid, rec, Kind.msix, entries)

    def _unmap(self, req: Unmap) -> Answer:
        m = self.live.get(req.bdf)
        if m is None or m.domid != req.domid or (m.held and m.kind is not req.kind):
            return Answer()                           # nothing of that kind: disabling is idempotent
        left = self._tear_down(m)
        if left and left.pirqs:
            return Answer(detail=f"PIRQs {list(left.pirqs)} failed to unmap; kept for retry")
        return Answer()

    def _query(self, req: Query) -> Answer:
        m = self.live.get(req.bdf)
        if m is None or not m.held or m.domid != req.domid:
            return Answer()
        return Answer(pirqs=m.pirqs, kind=m.kind, entries=m.entries)

    # -- effects ----------------------------------------------------------------

    def _map(self, domid: int, rec: FunctionRecord, kind: Kind, entries: tuple[int, ...]) -> Answer:
        bdf, ctrl = rec.bdf, control_offset(rec.cap(kind))   # type: ignore[arg-type]
        # The intent: an orphan without PIRQs (see module doc); the commit follows the last write.
        m = Mapping(domid, bdf, kind, entries, orphan=True)
        try:
            self._put(m)
        except OSError as exc:
            del self.live[bdf]                       # nothing done yet: nothing to journal
            return _failed(exc)
        top, base = (VECTOR_MAX, rec.table_base) if kind is Kind.msix else (PIRQ_MAX, 0)
        intx_before = COMMAND_INTX_DISABLE
        pirqs: list[int] = []
        try:
            intx_before = self.physdev.read_config(bdf, COMMAND, 2) & COMMAND_INTX_DISABLE
            if kind is Kind.msi:
                self._bits(bdf, ctrl, MSI_ENABLE, 0)
            else:
                self._bits(bdf, ctrl, 0, MSIX_ENABLE | MSIX_MASKALL)
            for entry in entries:
                pirq = self.physdev.map_pirq(domid, kind, bdf, entry, base)
                pirqs.append(pirq)
                if not 0 < pirq <= top:
                    raise PhysdevError(errno.ERANGE, f"PIRQ {pirq} does not fit the reply")
            if rec.intx:                 # a VF has no INTx: the bit reads 0 whatever is written
                self._bits(bdf, COMMAND, 0, COMMAND_INTX_DISABLE)
            if kind is Kind.msi:
                self._bits(bdf, ctrl, 0, MSI_ENABLE)
            else:
                self._bits(bdf, ctrl, MSIX_MASKALL, MSIX_ENABLE)
            # A guest answered with PIRQs that a replay would tear down must not be.
            m = replace(m, pirqs=tuple(pirqs), orphan=False)
            self._put(m)
        except OSError as exc:
            # A hypercall that failed mapped nothing, and none after it ran: no unknowns.
            done = replace(m, entries=entries[:len(pirqs)], pirqs=tuple(pirqs), orphan=True)
            self._tear_down(done, restore_intx=not intx_before)
            return _failed(exc)
        return Answer(pirqs=m.pirqs)

    def _tear_down(self, m: Mapping, restore_intx: bool = True) -> Mapping | None:
        """Controls off, PIRQs unmapped; what could not be unmapped stays journaled as an orphan."""
        self._disable(m.bdf, m.kind, restore_intx)
        kept_entries, kept_pirqs = self._unmap_pirqs(m.domid, m.entries, m.pirqs)
        unknown = m.entries[len(m.pirqs):]                # interrupted map: may exist, unknown to us
        left = None
        if kept_pirqs or unknown:
            left = replace(m, entries=kept_entries + unknown, pirqs=kept_pirqs, orphan=True)
        try:
            self._put(left, m.bdf, m.domid)
        except OSError:
            pass          # best effort: the table is right, the domain's next save rewrites its file
        return left

    def _unmap_pirqs(self, domid: int, entries: tuple[int, ...],
                     pirqs: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Unmap each PIRQ; the (entries, PIRQs) that Xen still holds after a failure."""
        kept = []
        for entry, pirq in zip(entries, pirqs):
            try:
                self.physdev.unmap_pirq(domid, pirq)
            except OSError as exc:
                if exc.errno not in GONE:
                    kept.append((entry, pirq))
        return tuple(e for e, _ in kept), tuple(p for _, p in kept)

    def _disable(self, bdf: BDF, kind: Kind, restore_intx: bool = True) -> None:
        """Best effort (the guest may be gone, the function reset): never raises."""
        try:
            rec = self.records.get(bdf)
            cap = rec.cap(kind) if rec else find_capability(
                lambda offset, size: self.physdev.read_config(bdf, offset, size),
                CAP_MSI if kind is Kind.msi else CAP_MSIX)
            if cap is not None:
                self._bits(bdf, control_offset(cap), ENABLE_BITS[kind], 0)
            if restore_intx:
                self._bits(bdf, COMMAND, COMMAND_INTX_DISABLE, 0)
        except (OSError, ValueError):
            pass

    def _bits(self, bdf: BDF, offset: int, clear: int, set_: int) -> None:
        """One exact-width 16-bit read-modify-write, read back."""
        old = self.physdev.read_config(bdf, offset, 2)
        new = (old & ~clear) | set_
        if new != old:
            self.physdev.write_config(bdf, offset, 2, new)
        back = self.physdev.read_config(bdf, offset, 2)
        if back & (clear | set_) != set_:
            raise ReadbackError(errno.EIO, f"{bdf} {offset:#x}: wrote {new:#06x}, reads {back:#06x}")

    # -- the table and its journal --------------------------------------------------

    def _put(self, m: Mapping | None, bdf: BDF | None = None, domid: int | None = None) -> None:
        if m is None:
            if bdf in self.live and self.live[bdf].domid == domid:
                del self.live[bdf]
        else:
            bdf, domid = m.bdf, m.domid
            self.live[bdf] = m
        self._save(domid)                                  # type: ignore[arg-type]

    def _save(self, domid: int) -> None:
        try:
            self.journal.save(domid, tuple(m for m in self.live.values() if m.domid == domid))
        except OSError as exc:
            raise JournalError(errno.EIO, f"dom{domid}'s journal not written: {exc}") from exc


def _failed(exc: OSError) -> Answer:
    err = exc.errno or errno.EIO
    kind = "readback" if isinstance(exc, ReadbackError) else "journal" if isinstance(exc, JournalError) \
        else "hypervisor"
    return refused(err, kind, exc.strerror or str(exc))


_HANDLERS: dict[type, Callable[[Broker, object], Answer]] = {
    MapMsi: Broker._map_msi,             # type: ignore[dict-item]
    MapMsix: Broker._map_msix,           # type: ignore[dict-item]
    Unmap: Broker._unmap,                # type: ignore[dict-item]
    Query: Broker._query,                # type: ignore[dict-item]
    Leave: lambda broker, req: broker.unassign(req.bdf),         # type: ignore[attr-defined]
    Failed: lambda broker, req: Answer(),    # checked like any request; kept by the supervisor for status
}
