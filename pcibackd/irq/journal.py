"""The durable record of live PIRQs: one small file per guest, replaced whole.

Layout of the directory (``<runtime>/irq``)::

    dom<N>.json            the PIRQs mapped for guest N (absent: none)
    dom<N>.json.damaged    a dom<N>.json that did not validate, kept aside for a look;
                           while it exists guest N's record is unknown
    prepared.json          functions PHYSDEVOP_prepare_msix was done for
    prepared.json.damaged  likewise

Why whole files (:func:`~pcibackd.common.files.write_atomic`) rather than an
append-only log: the state is small (at most a few hundred PIRQs a guest), a
reader sees the old file or the new one, never a torn tail; there is nothing
to compact; and one damaged file costs one guest's record, not everyone's.
The directory belongs on tmpfs (``/run``): PIRQs live in the hypervisor and do
not survive a host reboot, and neither must their record.  Nothing is
fsync'ed for the same reason: only a process crash has to be survived.

Every file is validated in full on load; whatever does not validate is set
aside, reported and never half-trusted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from loguru import logger

from pcibackd.common.files import write_atomic
from pcibackd.irq.function import Kind
from pcibackd.irq.messages import DOMID_MAX, MAX_TABLE, PIRQ_MAX, Mapping
from pcibackd.irq.ports import Recorded
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import SH_INFO_MAX_VEC

FORMAT = "pcibackd-irq/1"
MAX_FILE = 1 << 20
MAX_MAPPINGS = 256                     # functions per guest
PREPARED = "prepared.json"
DAMAGED = ".damaged"
_DOM_RE = re.compile(r"^dom([1-9][0-9]{0,4})\.json$")
_MAPPING_KEYS = {"bdf", "kind", "entries", "pirqs", "orphan"}


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _is_int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def encode(domid: int, mappings: Sequence[Mapping]) -> bytes:
    doc = {"format": FORMAT, "domid": domid,
           "mappings": [{"bdf": str(m.bdf), "kind": m.kind.value, "entries": list(m.entries),
                         "pirqs": list(m.pirqs), "orphan": m.orphan} for m in mappings]}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _parse(blob: bytes) -> object:
    _want(len(blob) <= MAX_FILE, "too large")
    try:
        return json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc.__class__.__name__})") from None


def _mapping(domid: int, item: object) -> Mapping:
    _want(isinstance(item, dict) and set(item) == _MAPPING_KEYS, "mapping keys")
    assert isinstance(item, dict)
    _want(isinstance(item["bdf"], str) and len(item["bdf"]) <= 16, "bdf")
    bdf = BDF.parse(item["bdf"])
    _want(item["kind"] in (Kind.msi.value, Kind.msix.value), "kind")
    entries, pirqs = item["entries"], item["pirqs"]
    _want(isinstance(entries, list) and 1 <= len(entries) <= SH_INFO_MAX_VEC, "entries")
    _want(all(_is_int(e, 0, MAX_TABLE - 1) for e in entries) and len(set(entries)) == len(entries),
          "entry values")
    _want(isinstance(pirqs, list) and len(pirqs) <= len(entries), "pirqs")
    _want(all(_is_int(p, 1, PIRQ_MAX) for p in pirqs) and len(set(pirqs)) == len(pirqs), "pirq values")
    _want(isinstance(item["orphan"], bool), "orphan")
    kind = Kind(item["kind"])
    _want(kind is Kind.msix or entries == [0], "an MSI mapping has entry 0 only")
    return Mapping(domid, bdf, kind, tuple(entries), tuple(pirqs), item["orphan"])


def decode(domid: int, blob: bytes) -> tuple[Mapping, ...]:
    """Validate guest ``domid``'s journal; ValueError on anything unexpected."""
    doc = _parse(blob)
    _want(isinstance(doc, dict) and set(doc) == {"format", "domid", "mappings"}, "keys")
    assert isinstance(doc, dict)
    _want(doc["format"] == FORMAT, "format")
    _want(doc["domid"] == domid and type(doc["domid"]) is int, "domid does not match the file name")
    items = doc["mappings"]
    _want(isinstance(items, list) and len(items) <= MAX_MAPPINGS, "mappings")
    out = tuple(_mapping(domid, item) for item in items)
    _want(len({m.bdf for m in out}) == len(out), "a function listed twice")
    return out


def decode_prepared(blob: bytes) -> frozenset[BDF]:
    doc = _parse(blob)
    _want(isinstance(doc, dict) and set(doc) == {"format", "prepared"} and doc["format"] == FORMAT, "keys")
    assert isinstance(doc, dict)
    items = doc["prepared"]
    _want(isinstance(items, list) and len(items) <= 4096, "prepared")
    _want(all(isinstance(t, str) and len(t) <= 16 for t in items), "bdf")
    return frozenset(BDF.parse(t) for t in items)


class Journal:
    """The :class:`~pcibackd.irq.ports.JournalStore` on files; see module doc."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dom(self, domid: int) -> Path:
        return self.dir / f"dom{domid}.json"

    def save(self, domid: int, mappings: Sequence[Mapping]) -> None:
        if mappings:
            write_atomic(self._dom(domid), encode(domid, mappings))
        else:
            self._dom(domid).unlink(missing_ok=True)

    def save_prepared(self, prepared: Iterable[BDF]) -> None:
        doc = {"format": FORMAT, "prepared": sorted(str(b) for b in prepared)}
        write_atomic(self.dir / PREPARED, json.dumps(doc, separators=(",", ":")).encode())

    def forget(self, domid: int) -> None:
        """Guest ``domid`` is gone: drop its record, damaged or not."""
        self._dom(domid).unlink(missing_ok=True)
        self.dir.joinpath(f"dom{domid}.json{DAMAGED}").unlink(missing_ok=True)

    def _set_aside(self, path: Path, reason: str, problems: list[str]) -> None:
        problems.append(f"{path.name}: {reason}; kept as {path.name}{DAMAGED}")
        logger.warning("irq journal: {}", problems[-1])
        os.replace(path, path.with_name(path.name + DAMAGED))

    def load(self) -> Recorded:
        """Read and validate everything (once, at start, before any write)."""
        mappings: dict[int, tuple[Mapping, ...]] = {}
        damaged: set[int] = set()
        problems: list[str] = []
        prepared: frozenset[BDF] = frozenset()
        prepared_damaged = False
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if name.startswith(".") and ".tmp" in name:
                path.unlink(missing_ok=True)            # a write_atomic cut short by a crash
                continue
            if name.endswith(DAMAGED):
                m = _DOM_RE.match(name[:-len(DAMAGED)])
                if m and int(m.group(1)) <= DOMID_MAX:
                    damaged.add(int(m.group(1)))
                elif name == PREPARED + DAMAGED:
                    prepared_damaged = True
                continue
            m = _DOM_RE.match(name)
            try:
                if name == PREPARED:
                    prepared = decode_prepared(path.read_bytes())
                elif m and int(m.group(1)) <= DOMID_MAX:
                    maps = decode(int(m.group(1)), path.read_bytes())
                    if maps:
                        mappings[int(m.group(1))] = maps
                else:
                    problems.append(f"{name}: not a journal file; ignored")
                    logger.warning("irq journal: {}", problems[-1])
            except (ValueError, OSError) as exc:
                self._set_aside(path, str(exc), problems)
                if name == PREPARED:
                    prepared_damaged = True
                else:
                    damaged.add(int(m.group(1)))       # type: ignore[union-attr]
        return Recorded(mappings, prepared, frozenset(damaged), prepared_damaged, tuple(problems))
