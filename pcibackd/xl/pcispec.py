"""One PCI spec in xl-pci-configuration(5) syntax, parsed without I/O.

``[DDDD:]BB:DD.F[@VSLOT][,KEY=VALUE...]`` (also ``bdf=`` and ``vslot=`` as keys;
``F`` may be ``*``: every function of the slot).  :data:`KEYS` says what each key
does for a PV guest: ``permissive``, ``seize``, ``name`` and the virtual slot act;
``msitranslate``, ``power_mgmt`` and ``rdm_policy`` are HVM-only (device-model and
RMRR settings), so their defaults are accepted as no-ops and any other value is
refused rather than silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pcibackd.wire.bdf import BDF

MAX_SPEC = 256
_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7*])$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_BOOL = {"1": True, "0": False, "yes": True, "no": False, "true": True, "false": False}


class SpecError(ValueError):
    """A spec xl would not accept, or one pcibackd cannot honour for a PV guest."""


@dataclass(frozen=True)
class PciSpec:
    """A parsed spec; ``functions`` is None for a ``.*`` wildcard (every function of the slot)."""

    domain: int
    bus: int
    dev: int
    fn: int | None
    vslot: int | None = None
    permissive: bool = False
    seize: bool = False
    name: str | None = None

    @property
    def bdf(self) -> BDF:
        if self.fn is None:
            raise SpecError(f"{self.slot_text}.* names every function of a slot, not one")
        return BDF(self.domain, self.bus, self.dev, self.fn)

    @property
    def slot_text(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.dev:02x}"

    def matches(self, bdf: BDF) -> bool:
        return ((bdf.domain, bdf.bus, bdf.dev) == (self.domain, self.bus, self.dev)
                and self.fn in (None, bdf.fn))

    @property
    def opts(self) -> str:
        """The ``opts-N`` node libxl writes for it (HVM keys at their defaults)."""
        return f"msitranslate=0,power_mgmt=0,permissive={int(self.permissive)},rdm_policy=strict"

    def __str__(self) -> str:
        text = f"{self.slot_text}." + ("*" if self.fn is None else f"{self.fn:x}")
        if self.vslot is not None:
            text += f"@{self.vslot:02x}"
        for key, on in (("permissive", self.permissive), ("seize", self.seize)):
            if on:
                text += f",{key}=1"
        return text + (f",name={self.name}" if self.name else "")


def _bool(key: str, untrusted: str) -> bool:
    try:
        return _BOOL[untrusted.lower()]
    except KeyError:
        raise SpecError(f"{key}={untrusted[:20]!r}: expected 0 or 1") from None


def _vslot(untrusted: str) -> int:
    try:
        slot = int(untrusted, 16)
    except ValueError:
        raise SpecError(f"virtual slot {untrusted[:20]!r} is not a hex number") from None
    if not 0 <= slot <= 0x1F:
        raise SpecError(f"virtual slot {untrusted[:20]!r} is out of range (00-1f)")
    return slot


def _hvm_only(default: str, what: str):
    def check(key: str, untrusted: str, into: dict) -> None:
        value = untrusted.lower()
        same = (_bool(key, value) == _BOOL[default]) if default in _BOOL else value == default
        if not same:
            raise SpecError(f"{key}={untrusted[:20]} is HVM-only ({what}); a PV guest served by pcibackd "
                            f"cannot honour it: remove it or set {key}={default}")
    return check


def _set(field: str, convert):
    def apply(key: str, untrusted: str, into: dict) -> None:
        into[field] = convert(key, untrusted)
    return apply


def _name(key: str, untrusted: str) -> str:
    if not _NAME_RE.match(untrusted):
        raise SpecError(f"name={untrusted[:20]!r}: letters, digits, '_', '.', '-' only (at most 64)")
    return untrusted


# key -> (acts for PV, what it does, how it is applied)
KEYS: dict[str, tuple[bool, str, object]] = {
    "bdf": (True, "the host function", lambda k, v, into: into.update(_bdf(v))),
    "vslot": (True, "virtual slot in the guest (vpci topology)", lambda k, v, into: into.update(vslot=_vslot(v))),
    "permissive": (True, "let the guest write registers no rule covers (unsafe)", _set("permissive", _bool)),
    "seize": (True, "make the function assignable first if it is not", _set("seize", _bool)),
    "name": (True, "a name for the function (name-N)", _set("name", lambda k, v: _name(k, v))),
    "msitranslate": (False, "QEMU's MSI translation", _hvm_only("0", "QEMU's MSI-INTx translation")),
    "power_mgmt": (False, "QEMU's power management", _hvm_only("0", "the device model's power management")),
    "rdm_policy": (False, "reserved-memory (RMRR) policy", _hvm_only("strict", "the reserved-device-memory policy")),
}


def _bdf(untrusted: str) -> dict:
    text, _, slot = untrusted.partition("@")
    m = _BDF_RE.match(text.strip())
    if not m:
        raise SpecError(f"not a PCI address: {text[:40]!r} (expected [DDDD:]BB:DD.F)")
    dom, bus, dev, fn = m.groups()
    if int(dev, 16) > 0x1F:
        raise SpecError(f"device {dev} out of range in {text[:40]!r} (00-1f)")
    out = {"domain": int(dom or "0", 16), "bus": int(bus, 16), "dev": int(dev, 16),
           "fn": None if fn == "*" else int(fn)}
    if slot:
        out["vslot"] = _vslot(slot)
    return out


def parse_spec(untrusted: str, defaults: dict | None = None) -> PciSpec:
    """Parse one spec; ``defaults`` (from ``pci_permissive=`` etc.) apply unless the spec sets a key.

    Raises :class:`SpecError` naming the part that is wrong.
    """
    if not isinstance(untrusted, str) or not untrusted.strip():
        raise SpecError("empty PCI spec")
    if len(untrusted) > MAX_SPEC:
        raise SpecError(f"PCI spec longer than {MAX_SPEC} characters")
    fields: dict = {}
    for key, value in (defaults or {}).items():
        KEYS[key][2](key, str(value), fields)
    for i, part in enumerate(p.strip() for p in untrusted.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            if i != 0:
                raise SpecError(f"{part[:40]!r}: expected KEY=VALUE")
            key, value = "bdf", part
        key = key.strip()
        if key not in KEYS:
            raise SpecError(f"unknown key {key[:20]!r} (known: {', '.join(KEYS)})")
        KEYS[key][2](key, value.strip(), fields)
    if "bus" not in fields:
        raise SpecError(f"{untrusted[:40]!r} names no PCI function")
    return PciSpec(**fields)


def parse_pattern(untrusted: str) -> PciSpec:
    """A bare address or ``DDDD:BB:DD.*`` wildcard (the ``[devices] hide`` and xen-pciback.hide form)."""
    if "," in untrusted or "@" in untrusted:
        raise SpecError(f"{untrusted[:40]!r}: only an address or DDDD:BB:DD.* here")
    return parse_spec(untrusted)
