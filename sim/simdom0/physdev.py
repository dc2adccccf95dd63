"""A model of Xen 4.17's PIRQ and MSI plumbing: the simulated dom0's ``Physdev`` for the broker.

What is modelled (facts: docs/interrupts.md):

* per domain a PIRQ space of ``nr_irqs_gsi + extra_guest_irqs``; MSI PIRQs come
  from the top down to ``nr_irqs_gsi`` (``get_free_pirq``), then ``ENOSPC``;
* ``map_pirq`` needs the function assigned to the domain (``pci_get_pdev``:
  ``ENODEV``); a non-zero ``table_base`` selects MSI-X (as in ``pci_enable_msi``),
  which needs ``prepare_msix`` first (``ENODATA``), memory decoding
  (``ENXIO``; a VF's is its physical function's) and ``entry < table size`` (``EINVAL``);
* Xen does NOT refuse a second mapping of the same MSI-X entry (or a second
  MSI): it happens, and is counted in :attr:`SimPhysdev.double_maps`;
* ``prepare_msix``: ``EBUSY`` when prepared already, ``ENXIO`` with decoding
  off; on a function WITHOUT MSI-X real Xen dereferences NULL, modelled as
  :class:`SimXenCrash`; ``release_msix``: ``EBUSY`` unless prepared and no
  MSI-X PIRQ is mapped;
* ``unmap_pirq``: ``ESRCH`` for a domain that is gone, ``EINVAL`` for a PIRQ
  that is not mapped; :meth:`SimPhysdev.destroy_domain` frees every PIRQ
  (``free_domain_pirqs``);
* dom0's config writes pass the intercept (``pci_msi_conf_write_intercept``):
  inside an MSI-X capability only a 2-byte write of Message Control goes
  through (MASKALL forced on while ``host_maskall``); for a maskable MSI with a
  mapping only a 2-byte control write or a 4-byte mask write; every other write
  there is DROPPED with success, and listed in :attr:`SimPhysdev.dropped`;
* ``restore_msi`` sets ENABLE again for what is mapped (Xen writes the device
  directly, past its own intercept).

Two switches for the simulated dom0 (:meth:`simdom0.platform.SimPlatform.physdev`):
``assume_assigned`` stands for the toolstack's ``xc_assign_device``, which the
simulated toolstack does not make (every function counts as assigned to the
domain asking, and a domain exists once asked for); ``state_file`` keeps
Xen's state (PIRQ bindings, prepared functions, double maps, dropped writes)
in a JSON file, so it outlives the supervisor process, as Xen's state would,
and tests can read it (:func:`read_state`).  A map or unmap appends one line
to ``<state_file>.log`` (so a 64-vector map costs 64 small appends, not 64
rewrites of every binding); any other change rewrites the snapshot, which
starts a new generation and drops the log.

Not modelled: message address/data and the MSI-X table contents, per-vector
masks, interrupt remapping, multi-MSI, PCI segments (the address is passed whole).
"""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pcibackd.common.files import write_atomic

from pcibackd.hostpci.port import HostPort, find_capability
from pcibackd.irq.function import Kind, control_offset, msix_table_size
from pcibackd.wire.pciregs import CAP_MSI, CAP_MSIX, COMMAND, COMMAND_MEM, MSIX_ENABLE, MSIX_MASKALL, MSIX_PBA, MSI_64BIT, MSI_ENABLE, MSI_MASKABLE
from pcibackd.irq.ports import PhysdevError
from pcibackd.wire.bdf import BDF

INTERCEPT_START, INTERCEPT_END = 64, 256
LOG_LINES = 4096                  # maps and unmaps appended before the snapshot is rewritten


def _log_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".log")


def _binding_doc(b: "Binding") -> dict:
    # by hand: dataclasses.asdict deep-copies, and this runs for every PIRQ of a snapshot
    return {"domid": b.domid, "pirq": b.pirq, "bdf": str(b.bdf), "kind": b.kind.value,
            "entry": b.entry, "table_base": b.table_base}


def read_state(state_file: Path) -> dict:
    """Xen's state as :meth:`SimPhysdev.state` gives it, from the snapshot and its log."""
    while True:
        doc = json.loads(state_file.read_text())
        try:
            lines = _log_path(state_file).read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        again = json.loads(state_file.read_text())
        if again.get("generation") == doc.get("generation"):
            break                                 # no snapshot was written meanwhile
    bindings = {(b["domid"], b["pirq"]): b for b in doc["bindings"]}
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            break                                 # the end of a line a killed writer left
        if event["generation"] != doc.get("generation"):
            continue
        if "map" in event:
            b = event["map"]
            bindings[(b["domid"], b["pirq"])] = b
            if event["double"]:
                doc["double_maps"].append(b)
        else:
            bindings.pop(tuple(event["unmap"]), None)
    doc["bindings"] = sorted(bindings.values(), key=lambda b: (b["domid"], b["pirq"]))
    return doc


class SimXenCrash(RuntimeError):
    """What real Xen would do is crash the host (a NULL dereference in the hypervisor)."""


@dataclass(frozen=True)
class Binding:
    """One PIRQ of a domain bound to a function's MSI or MSI-X entry."""

    domid: int
    pirq: int
    bdf: BDF
    kind: Kind
    entry: int
    table_base: int


@dataclass(frozen=True)
class Dropped:
    """A dom0 config write the intercept swallowed (the writer saw success)."""

    bdf: BDF
    offset: int
    size: int
    value: int
    reason: str


@dataclass
class _Domain:
    pirqs: dict[int, Binding] = field(default_factory=dict)
    alive: bool = True


class SimPhysdev:
    """See module doc.  ``open_device`` gives the function's config space (a HostPort)."""

    def __init__(self, open_device: Callable[[BDF], HostPort], nr_irqs_gsi: int = 24,
                 extra_guest_irqs: int = 32, assume_assigned: bool = False,
                 state_file: Path | None = None) -> None:
        self._open = open_device
        self.assume_assigned, self.state_file = assume_assigned, state_file
        self._ports: dict[BDF, HostPort] = {}
        self.nr_irqs_gsi, self.extra_guest_irqs = nr_irqs_gsi, extra_guest_irqs
        self.domains: dict[int, _Domain] = {}
        self.owner: dict[BDF, int] = {}
        self.prepared: set[BDF] = set()
        self.host_maskall: set[BDF] = set()
        self.double_maps: list[Binding] = []
        self.dropped: list[Dropped] = []
        self.calls: Counter = Counter()
        self.trail: list[tuple] = []        # what changed, in order: ("write"|"map"|"unmap"|..., bdf, ...)
        self._faults: dict[str, list[tuple[int, int]]] = {}
        self.generation = self._log_lines = 0
        if state_file is not None and state_file.exists():
            self._load(read_state(state_file))
            self._changed()                      # compacted: one snapshot, no log

    # -- the state file ---------------------------------------------------------

    def state(self) -> dict:
        """Xen's state as JSON-able data (what :attr:`state_file` holds)."""
        return {"generation": self.generation, "bindings": [_binding_doc(b) for b in self.bindings()],
                "dead_domains": sorted(d for d, dom in self.domains.items() if not dom.alive),
                "prepared": sorted(str(b) for b in self.prepared),
                "double_maps": [_binding_doc(b) for b in self.double_maps],
                "dropped": len(self.dropped), "calls": dict(self.calls)}

    def _load(self, doc: dict) -> None:
        for item in doc["bindings"]:
            b = Binding(item["domid"], item["pirq"], BDF.parse(item["bdf"]), Kind(item["kind"]),
                        item["entry"], item["table_base"])
            self.create_domain(b.domid)
            self.domains[b.domid].pirqs[b.pirq] = b
        for domid in doc["dead_domains"]:
            self.domains.setdefault(domid, _Domain()).alive = False
        self.prepared = {BDF.parse(t) for t in doc["prepared"]}
        self.calls.update(doc["calls"])
        self.generation = doc.get("generation", 0)

    def _changed(self) -> None:
        """Rewrite the snapshot (a new generation) and drop the log it now contains."""
        if self.state_file is not None:
            self.generation += 1
            self._log_lines = 0
            write_atomic(self.state_file, json.dumps(self.state(), sort_keys=True).encode())
            _log_path(self.state_file).unlink(missing_ok=True)

    def _logged(self, event: dict) -> None:
        """One map or unmap: a line appended to the log (the snapshot is rewritten now and then)."""
        if self.state_file is None:
            return
        self._log_lines += 1
        if self._log_lines > LOG_LINES:
            self._changed()
            return
        line = json.dumps(dict(event, generation=self.generation), sort_keys=True).encode() + b"\n"
        fd = os.open(_log_path(self.state_file), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)                    # one write: a killed process leaves whole lines
        finally:
            os.close(fd)

    # -- the toolstack's side and test controls ---------------------------------

    def create_domain(self, domid: int) -> None:
        self.domains.setdefault(domid, _Domain())

    def destroy_domain(self, domid: int) -> None:
        """The domain dies: Xen frees its PIRQs and takes its functions back."""
        dom = self.domains.get(domid)
        if dom is not None:
            dom.pirqs.clear()
            dom.alive = False
        for bdf in [b for b, d in self.owner.items() if d == domid]:
            del self.owner[bdf]
        self._changed()

    def assign(self, domid: int, bdf: BDF) -> None:
        """xc_assign_device (the domain is created if new)."""
        self.create_domain(domid)
        self.owner[bdf] = domid

    def deassign(self, bdf: BDF) -> None:
        self.owner.pop(bdf, None)

    def fail_next(self, call: str, err: int, after: int = 0) -> None:
        """Make the call of ``call`` after ``after`` successful ones fail with ``err`` (once)."""
        self._faults.setdefault(call, []).append((after, err))

    def bindings(self, domid: int | None = None) -> list[Binding]:
        if domid is None:
            doms = list(self.domains.values())
        else:
            doms = [self.domains[domid]] if domid in self.domains else []
        return sorted((b for d in doms for b in d.pirqs.values()), key=lambda b: (b.domid, b.pirq))

    def pirq_count(self, domid: int | None = None) -> int:
        return len(self.bindings(domid))

    # -- Physdev -----------------------------------------------------------------

    def prepare_msix(self, bdf: BDF) -> None:
        self._enter("prepare_msix")
        port = self._port(bdf)
        if find_capability(port.read, CAP_MSIX) is None:
            raise SimXenCrash(f"prepare_msix on {bdf}, which has no MSI-X: NULL dereference in Xen")
        if bdf in self.prepared:
            raise PhysdevError(errno.EBUSY, f"{bdf}: MSI-X already prepared")
        self._need_decoding(bdf, port)
        self.prepared.add(bdf)
        self.trail.append(("prepare", bdf))
        self._changed()

    def _need_decoding(self, bdf: BDF, port: HostPort) -> None:
        """Xen's ``memory_decoded``: a VF decodes as its physical function does."""
        physfn = port.info.physfn
        decoder = self._port(physfn) if physfn is not None else port
        if not decoder.read(COMMAND, 2) & COMMAND_MEM:
            raise PhysdevError(errno.ENXIO, f"{bdf}: memory decoding is off")

    def release_msix(self, bdf: BDF) -> None:
        self._enter("release_msix")
        self._port(bdf)
        if bdf not in self.prepared or any(b.bdf == bdf and b.kind is Kind.msix for b in self.bindings()):
            raise PhysdevError(errno.EBUSY, f"{bdf}: MSI-X not prepared, or still in use")
        self.prepared.discard(bdf)
        self.trail.append(("release", bdf))
        self._changed()

    def map_pirq(self, domid: int, kind: Kind, bdf: BDF, entry: int, table_base: int) -> int:
        self._enter("map_pirq")
        if self.assume_assigned:
            self.create_domain(domid)
        dom = self._domain(domid)
        if self.owner.get(bdf) != domid and not self.assume_assigned:
            raise PhysdevError(errno.ENODEV, f"{bdf} is not assigned to dom{domid}")
        port = self._port(bdf)
        kind = Kind.msix if table_base else Kind.msi          # Xen chooses by table_base alone
        if kind is Kind.msix:
            cap = find_capability(port.read, CAP_MSIX)
            if cap is None:
                raise PhysdevError(errno.ENODEV, f"{bdf} has no MSI-X")
            if bdf not in self.prepared:
                raise PhysdevError(errno.ENODATA, f"{bdf}: MSI-X table not known (prepare_msix)")
            self._need_decoding(bdf, port)
            if not 0 <= entry < msix_table_size(port.read(control_offset(cap), 2)):
                raise PhysdevError(errno.EINVAL, f"{bdf}: entry {entry} outside the table")
        else:
            if find_capability(port.read, CAP_MSI) is None:
                raise PhysdevError(errno.ENODEV, f"{bdf} has no MSI")
            entry = 0
        pirq = next((p for p in range(self.nr_irqs_gsi + self.extra_guest_irqs - 1, self.nr_irqs_gsi - 1, -1)
                     if p not in dom.pirqs), None)
        if pirq is None:
            raise PhysdevError(errno.ENOSPC, f"dom{domid}: no free PIRQ")
        binding = Binding(domid, pirq, bdf, kind, entry, table_base)
        double = any(b.bdf == bdf and b.kind is kind and b.entry == entry
                     for d in self.domains.values() for b in d.pirqs.values())
        if double:
            self.double_maps.append(binding)
        dom.pirqs[pirq] = binding
        self.trail.append(("map", bdf, pirq))
        self._logged({"map": _binding_doc(binding), "double": double})
        return pirq

    def unmap_pirq(self, domid: int, pirq: int) -> None:
        self._enter("unmap_pirq")
        dom = self._domain(domid)
        binding = dom.pirqs.pop(pirq, None)
        if binding is None:
            raise PhysdevError(errno.EINVAL, f"dom{domid}: PIRQ {pirq} is not mapped")
        self.trail.append(("unmap", binding.bdf, pirq))
        self._logged({"unmap": [domid, pirq]})

    def restore_msi(self, bdf: BDF) -> None:
        self._enter("restore_msi")
        port = self._port(bdf)
        kinds = {b.kind for b in self.bindings() if b.bdf == bdf}
        if Kind.msi in kinds:
            off = control_offset(find_capability(port.read, CAP_MSI))     # type: ignore[arg-type]
            port.write(off, 2, port.read(off, 2) | MSI_ENABLE)
        if Kind.msix in kinds:
            self._need_decoding(bdf, port)
            off = control_offset(find_capability(port.read, CAP_MSIX))    # type: ignore[arg-type]
            port.write(off, 2, port.read(off, 2) | MSIX_ENABLE)

    def read_config(self, bdf: BDF, offset: int, size: int) -> int:
        return self._port(bdf).read(offset, size)

    def write_config(self, bdf: BDF, offset: int, size: int, value: int) -> None:
        """dom0's write, through Xen's intercept (dropped writes still "succeed")."""
        port = self._port(bdf)
        reason = self._intercept(bdf, port, offset, size)
        if reason:
            self.dropped.append(Dropped(bdf, offset, size, value, reason))
            self._changed()
            return
        msix = find_capability(port.read, CAP_MSIX)
        if bdf in self.host_maskall and msix is not None and offset == control_offset(msix):
            value |= MSIX_MASKALL
        port.write(offset, size, value)
        self.trail.append(("write", bdf, offset, value))

    # -- internals ------------------------------------------------------------------

    def _intercept(self, bdf: BDF, port: HostPort, offset: int, size: int) -> str:
        """Why Xen drops this write ("" if it lets it through)."""
        if not INTERCEPT_START <= offset < INTERCEPT_END:
            return ""
        msix = find_capability(port.read, CAP_MSIX)
        if msix is not None and msix <= offset < msix + MSIX_PBA + 4:
            if offset != control_offset(msix) or size != 2:
                return "MSI-X capability: only a 2-byte Message Control write"
            return ""
        msi = find_capability(port.read, CAP_MSI)
        if msi is None or not any(b.bdf == bdf and b.kind is Kind.msi for b in self.bindings()):
            return ""
        flags = port.read(control_offset(msi), 2)
        if not flags & MSI_MASKABLE:
            return ""                       # no intercept at all: Xen's address/data are exposed
        mask = msi + (0x10 if flags & MSI_64BIT else 0x0C)
        if not msi <= offset < mask + 8:
            return ""
        if offset == control_offset(msi):
            return "" if size == 2 else "MSI: Message Control only 2 bytes wide"
        if offset != mask or size != 4:
            return "MSI: only a 4-byte mask-bits write"
        return ""

    def _enter(self, call: str) -> None:
        self.calls[call] += 1
        pending = self._faults.get(call)
        if not pending:
            return
        after, err = pending[0]
        if after > 0:
            pending[0] = (after - 1, err)
            return
        pending.pop(0)
        raise PhysdevError(err, f"injected failure of {call}")

    def _domain(self, domid: int) -> _Domain:
        dom = self.domains.get(domid)
        if dom is None or not dom.alive:
            raise PhysdevError(errno.ESRCH, f"no domain {domid}")
        return dom

    def _port(self, bdf: BDF) -> HostPort:
        port = self._ports.get(bdf)
        if port is None:
            try:
                port = self._ports[bdf] = self._open(bdf)
            except (FileNotFoundError, KeyError):
                raise PhysdevError(errno.ENODEV, f"Xen does not know {bdf}") from None
        return port
