"""The assignable pool: host functions set aside for guests, persisted across daemon restarts.

``<state_dir>/pool.json`` holds each function's original dom0 driver (to give
it back with ``assignable-remove -r``), its optional name and how it joined
(``hide`` at start, ``add`` by command, ``seize`` by an attach).  Written
atomically after every change, so a crash leaves the old or the new pool.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from pcibackd.common.files import write_atomic
from pcibackd.wire.bdf import BDF

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
