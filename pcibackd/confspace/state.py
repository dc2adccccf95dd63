"""The guest-changeable emulated state of one device, and its snapshot format.

Only what a guest can change lives here (virtual COMMAND bits, whether the
guest enabled the device, BARs in sizing mode) plus the run-time knobs; all
captured values (BAR addresses, IDs, IRQ) are re-read from the host at every
build, so a snapshot can never move a BAR.  The snapshot is versioned JSON
bound to the device's identity; :func:`decode` validates every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pcibackd.hostpci.port import DeviceInfo

FORMAT = "pcibackd-confspace/1"
_MAX_SNAPSHOT = 4096


@dataclass
class EmuState:
    """Mutable per-guest state; see module doc."""

    command: int = 0                       # emulated COMMAND bits (header.COMMAND_EMU)
    enabled: bool = False                  # guest turned decode on (pci_enable_device analogue)
    sizing: set[int] = field(default_factory=set)   # BAR/ROM offsets in sizing mode
    allow_interrupt_control: bool = False
    permissive_override: bool | None = None          # pcibackctl permissive on|off
    denied_writes: int = 0

    def key(self) -> tuple:
        """Comparable summary, to detect changes cheaply."""
        return (self.command, self.enabled, frozenset(self.sizing), self.allow_interrupt_control,
                self.permissive_override)


def _identity(info: DeviceInfo) -> dict:
    return {"bdf": str(info.bdf), "vendor": info.vendor, "device": info.device,
            "config_size": info.config_size}


def encode(state: EmuState, info: DeviceInfo) -> bytes:
    """Serialise ``state`` for ``info``."""
    doc = {"format": FORMAT, "device": _identity(info), "command": state.command,
           "enabled": state.enabled, "sizing": sorted(state.sizing),
           "allow_interrupt_control": state.allow_interrupt_control,
           "permissive_override": state.permissive_override,
           "denied_writes": state.denied_writes}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode(blob: bytes, info: DeviceInfo, command_mask: int, bar_offsets: set[int]) -> EmuState:
    """Parse and validate a snapshot of ``info``; ValueError on anything unexpected."""
    _want(isinstance(blob, (bytes, bytearray)) and len(blob) <= _MAX_SNAPSHOT, "size")
    try:
        doc = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc.__class__.__name__}") from None
    _want(isinstance(doc, dict) and doc.get("format") == FORMAT, "format")
    _want(doc.get("device") == _identity(info), "snapshot of another device")
    command, sizing, denied = doc.get("command"), doc.get("sizing"), doc.get("denied_writes")
    _want(_is_int(command) and command & ~command_mask == 0 and command >= 0, "command")
    _want(isinstance(sizing, list) and all(_is_int(o) and o in bar_offsets for o in sizing),
          "sizing")
    _want(_is_int(denied) and denied >= 0, "denied_writes")
    for key in ("enabled", "allow_interrupt_control"):
        _want(isinstance(doc.get(key), bool), key)
    override = doc.get("permissive_override")
    _want(override is None or isinstance(override, bool), "permissive_override")
    _want(set(doc) == {"format", "device", "command", "enabled", "sizing",
                       "allow_interrupt_control", "permissive_override", "denied_writes"},
          "unexpected keys")
    return EmuState(command, doc["enabled"], set(sizing), doc["allow_interrupt_control"],
                    override, denied)
