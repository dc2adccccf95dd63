"""Config-space policy as data: permissive mode, quirks and hidden capabilities.

The TOML file (see etc/pcibackd-policy.toml) has a global ``permissive`` and
``[device."<key>"]`` tables keyed by ``vvvv:dddd``, ``vvvv:dddd:ssvv:ssdd``
(with subsystem IDs) or a BDF (``dddd:bb:dd.f`` / ``bb:dd.f``).  All matching
tables apply, least specific first (id, id+subsystem, BDF): a more specific
``permissive`` overrides, hide lists and quirks accumulate.  Files are parsed
strictly: an unknown key or a bad value is an error, never a silent default.
:class:`PolicyStore` reads the file; it is the only part of confspace that
opens a file.
"""

from __future__ import annotations

import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.port import DeviceInfo
from pcibackd.wire.pciregs import CAP_NAMES, EXT_CAP_NAMES

_HEX4 = re.compile(r"^[0-9a-fA-F]{4}$")
_DEVICE_KEYS = {"permissive", "hide_capabilities", "hide_extended_capabilities", "quirks", "note"}
_QUIRK_KEYS = {"offset", "size", "mask", "note"}


class PolicyError(ValueError):
    """The policy file is malformed; the previous policy stays in effect."""


@dataclass(frozen=True)
class Quirk:
    """An extra guest-writable field: ``mask`` bits of ``size`` bytes at ``offset``."""

    offset: int
    size: int
    mask: int

    def __post_init__(self) -> None:
        if self.size not in (1, 2, 4):
            raise PolicyError(f"quirk size {self.size} not 1, 2 or 4")
        if not 0 <= self.offset <= 0xFFF or self.offset % self.size:
            raise PolicyError(f"quirk offset {self.offset:#x} not aligned inside 0..0xfff")
        if not 0 <= self.mask < 1 << (8 * self.size):
            raise PolicyError(f"quirk mask {self.mask:#x} does not fit {self.size} bytes")


@dataclass(frozen=True)
class DevicePolicy:
    """The effective policy of one device."""

    permissive: bool = False
    hidden_caps: frozenset[int] = frozenset()
    hidden_ext_caps: frozenset[int] = frozenset()
    quirks: tuple[Quirk, ...] = ()
    matched: tuple[str, ...] = field(default=(), compare=False)   # keys that applied


DEFAULT_POLICY = DevicePolicy()


def _parse_key(key: str) -> tuple[int, object]:
    """(specificity, match value) of a ``[device."..."]`` key."""
    if "." in key:
        try:
            return 2, BDF.parse(key)
        except ValueError as exc:
            raise PolicyError(f"device key {key!r}: {exc}") from None
    parts = key.split(":")
    if len(parts) in (2, 4) and all(_HEX4.match(p) for p in parts):
        ids = tuple(int(p, 16) for p in parts)
        return (0 if len(parts) == 2 else 1), ids
    raise PolicyError(f"device key {key!r} is not vvvv:dddd, vvvv:dddd:ssvv:ssdd or a BDF")


def _cap_list(value: Any, names: dict[str, int], limit: int, where: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list")
    out = set()
    for item in value:
        if isinstance(item, str) and item.lower() in names:
            out.add(names[item.lower()])
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= limit:
            out.add(item)
        else:
            raise PolicyError(f"{where}: unknown capability {item!r}")
    return frozenset(out)


def _int(table: dict, key: str, where: str) -> int:
    value = table.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PolicyError(f"{where}: {key} must be an integer")
    return value


@dataclass(frozen=True)
class _Entry:
    key: str
    rank: int
    match: object
    permissive: bool | None
    hidden_caps: frozenset[int]
    hidden_ext_caps: frozenset[int]
    quirks: tuple[Quirk, ...]

    def matches(self, info: DeviceInfo) -> bool:
        if self.rank == 2:
            return self.match == info.bdf
        ids = (info.vendor, info.device, info.subsystem_vendor, info.subsystem_device)
        return ids[:len(self.match)] == self.match        # type: ignore[arg-type]


def _parse_entry(key: str, table: Any) -> _Entry:
    where = f'device."{key}"'
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table")
    unknown = set(table) - _DEVICE_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    rank, match = _parse_key(key)
    permissive = table.get("permissive")
    if permissive is not None and not isinstance(permissive, bool):
        raise PolicyError(f"{where}: permissive must be true or false")
    quirks = []
    for i, q in enumerate(table.get("quirks", [])):
        qwhere = f"{where}.quirks[{i}]"
        if not isinstance(q, dict) or set(q) - _QUIRK_KEYS:
            raise PolicyError(f"{qwhere}: expected a table of offset, size, mask")
        quirks.append(Quirk(_int(q, "offset", qwhere), _int(q, "size", qwhere),
                            _int(q, "mask", qwhere)))
    return _Entry(
        key, rank, match, permissive,
        _cap_list(table.get("hide_capabilities", []), CAP_NAMES, 0xFF, where),
        _cap_list(table.get("hide_extended_capabilities", []), EXT_CAP_NAMES, 0xFFFF, where),
        tuple(quirks))


@dataclass(frozen=True)
class PolicyFile:
    """A parsed policy file."""

    permissive: bool = False
    entries: tuple[_Entry, ...] = ()

    def for_device(self, info: DeviceInfo) -> DevicePolicy:
        """The effective policy of ``info`` (most specific ``permissive`` wins)."""
        permissive = self.permissive
        hidden: set[int] = set()
        hidden_ext: set[int] = set()
        quirks: list[Quirk] = []
        matched = []
        for entry in sorted((e for e in self.entries if e.matches(info)), key=lambda e: e.rank):
            matched.append(entry.key)
            if entry.permissive is not None:
                permissive = entry.permissive
            hidden |= entry.hidden_caps
            hidden_ext |= entry.hidden_ext_caps
            quirks[:0] = entry.quirks            # more specific quirks first: they win overlaps
        return DevicePolicy(permissive, frozenset(hidden), frozenset(hidden_ext), tuple(quirks),
                            tuple(matched))


def parse_policy(text: str) -> PolicyFile:
    """Parse policy TOML text; PolicyError on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}") from None
    unknown = set(data) - {"permissive", "device"}
    if unknown:
        raise PolicyError(f"unknown top-level keys {sorted(unknown)}")
    permissive = data.get("permissive", False)
    if not isinstance(permissive, bool):
        raise PolicyError("permissive must be true or false")
    devices = data.get("device", {})
    if not isinstance(devices, dict):
        raise PolicyError("device must be a table of device tables")
    return PolicyFile(permissive, tuple(_parse_entry(k, v) for k, v in devices.items()))


def read_policy_text(path: Path | str | None) -> str | None:
    """The checked text of policy file ``path`` (None: no file, the built-in defaults);
    PolicyError when it cannot be read or is malformed."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from None
    parse_policy(text)
    return text


class PolicyStore:
    """The policy file of a running daemon: loaded at start, reloadable.

    ``for_device`` remembers every device it was asked about so ``reload``
    can hand back the new policy of each (callers then call
    ``ConfSpace.set_policy``).
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._devices: dict[BDF, DeviceInfo] = {}
        self._file = self._load()

    def _load(self) -> PolicyFile:
        text = read_policy_text(self.path)
        return PolicyFile() if text is None else parse_policy(text)

    @property
    def permissive(self) -> bool:
        """The global permissive setting."""
        return self._file.permissive

    def for_device(self, info: DeviceInfo) -> DevicePolicy:
        """The effective policy of a device (and remember it for reloads)."""
        with self._lock:
            self._devices[info.bdf] = info
            return self._file.for_device(info)

    def forget(self, bdf: BDF) -> None:
        """Stop tracking a device (it left the guest)."""
        with self._lock:
            self._devices.pop(bdf, None)

    def reload(self, text: str | None = None) -> dict[BDF, DevicePolicy]:
        """Re-read the file (or take its ``text``, read by the supervisor for a worker that
        may not open it); return the new policy of every tracked device.

        Raises PolicyError (and keeps the old policy) if the file is malformed.
        """
        new = self._load() if text is None else parse_policy(text)
        with self._lock:
            self._file = new
            result = {bdf: new.for_device(info) for bdf, info in self._devices.items()}
        logger.info("policy reloaded from {}: {} device entries", self.path, len(new.entries))
        return result
