"""Spec-based model of which config-space bits hardware lets software change.

The register tables (:mod:`.hwtables`, written in :mod:`.hwspec`) are
compiled against one device's config bytes and sysfs resources into two byte
masks: ``rw`` (a write replaces the bit) and ``rw1c`` (writing 1 clears the
bit).  Every other bit is read-only.  A few registers also need a hook for a
value-dependent rule.  :class:`Model` applies writes the way the device would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pcibackd.wire.pciregs import (
    CAP_PCIE, CAPABILITY_LIST, CARDBUS_CAPABILITY_LIST, EXT_CAP_START, HEADER_END, HEADER_TYPE,
    HEADER_TYPE_MASK, STATUS, STATUS_CAP_LIST)
from pcibackd.hostpci.port import Resource
from simdom0.hwspec import U32, Ctx, HwReg, mask_value
from simdom0.hwtables import EXTENDED_CAPS, HEADER_COMMON, HEADER_TABLES, HOOKS, LEGACY_CAPS, RESET_METHODS

CAP_POINTER = {0: CAPABILITY_LIST, 1: CAPABILITY_LIST, 2: CARDBUS_CAPABILITY_LIST}  # by header type
MAX_CAPS = 64                                # bounds a looped list


@dataclass(frozen=True)
class Field:
    """A compiled register at an absolute offset."""

    name: str
    offset: int
    size: int
    rw: int
    rw1c: int


@dataclass(frozen=True)
class Capability:
    """One entry of a capability list as found in the config bytes."""

    kind: str        # "legacy" | "extended"
    cap_id: int
    offset: int
    name: str


# --- capability walk ------------------------------------------------------------

def find_capabilities(cfg: bytes) -> list[Capability]:
    """Walk the legacy list and, for 4096-byte config spaces, the extended list."""
    caps: list[Capability] = []
    header_type = cfg[HEADER_TYPE] & HEADER_TYPE_MASK
    status = int.from_bytes(cfg[STATUS:STATUS + 2], "little")
    if status & STATUS_CAP_LIST and header_type in CAP_POINTER:
        ptr, seen = cfg[CAP_POINTER[header_type]] & 0xFC, set()
        while ptr >= HEADER_END and ptr not in seen and len(seen) < MAX_CAPS:
            seen.add(ptr)
            cap_id = cfg[ptr]
            name = LEGACY_CAPS.get(cap_id, (f"cap{cap_id:02x}",))[0]
            caps.append(Capability("legacy", cap_id, ptr, name))
            ptr = cfg[ptr + 1] & 0xFC
    if len(cfg) > EXT_CAP_START:
        ptr, seen = EXT_CAP_START, set()
        while ptr >= EXT_CAP_START and ptr not in seen and len(seen) < MAX_CAPS:
            seen.add(ptr)
            header = int.from_bytes(cfg[ptr:ptr + 4], "little")
            if header in (0, U32):
                break
            cap_id = header & 0xFFFF
            caps.append(Capability("extended", cap_id, ptr,
                                   EXTENDED_CAPS.get(cap_id, (f"ecap{cap_id:04x}",))[0]))
            ptr = (header >> 20) & 0xFFC
    return caps


# --- the compiled model -----------------------------------------------------------

@dataclass
class Model:
    """Compiled writable-bit masks of one function, serialisable to JSON."""

    config_size: int
    rw: bytes
    rw1c: bytes
    fields: tuple[Field, ...] = ()
    hooks: tuple[tuple[str, int, int], ...] = ()      # (name, offset, size)
    capabilities: tuple[Capability, ...] = ()
    # offset -> (size, forced power-on value)
    initial: dict[int, tuple[int, int]] = field(default_factory=dict)

    def apply(self, cfg: bytes, offset: int, size: int, value: int) -> bytes:
        """Return the new ``size`` bytes at ``offset`` after hardware takes ``value``."""
        end = offset + size
        new = bytearray(cfg)
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            rw, rw1c = self.rw[offset + i], self.rw1c[offset + i]
            new[offset + i] = ((new[offset + i] & ~rw) | (byte & rw)) & ~(byte & rw1c) & 0xFF
        for name, hook_off, hook_size in self.hooks:
            if hook_off < end and offset < hook_off + hook_size:
                HOOKS[name](cfg, new, hook_off)
        return bytes(new[offset:end])

    def describe(self, offset: int) -> str:
        """Name of the modelled register holding ``offset`` ('' if read-only/unmodelled)."""
        for f in self.fields:
            if f.offset <= offset < f.offset + f.size:
                return f.name
        return ""

    def to_dict(self) -> dict:
        """JSON-ready form (``sim-model.json``)."""
        return {
            "format": 1,
            "config_size": self.config_size,
            "rw": self.rw.hex(),
            "rw1c": self.rw1c.hex(),
            "hooks": [list(h) for h in self.hooks],
            "initial": {str(k): list(v) for k, v in self.initial.items()},
            "capabilities": [[c.kind, c.cap_id, c.offset, c.name] for c in self.capabilities],
            "fields": [[f.name, f.offset, f.size, f.rw, f.rw1c] for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Model":
        """Inverse of :meth:`to_dict`; ValueError for an unknown format."""
        if d.get("format") != 1:
            raise ValueError("unknown sim model format")
        return cls(
            config_size=d["config_size"],
            rw=bytes.fromhex(d["rw"]),
            rw1c=bytes.fromhex(d["rw1c"]),
            hooks=tuple(tuple(h) for h in d["hooks"]),
            initial={int(k): tuple(v) for k, v in d["initial"].items()},
            capabilities=tuple(Capability(*c) for c in d["capabilities"]),
            fields=tuple(Field(*f) for f in d["fields"]),
        )


def compile_model(cfg: bytes, resources: tuple[Resource, ...], virtfn: bool = False) -> Model:
    """Evaluate the tables against one function's config bytes and resources
    (``virtfn``: an SR-IOV VF, whose resources are not its BAR registers')."""
    ctx = Ctx(bytes(cfg), tuple(resources), virtfn)
    size = len(cfg)
    rw, rw1c = bytearray(size), bytearray(size)
    fields: list[Field] = []
    hooks: list[tuple[str, int, int]] = []
    initial: dict[int, tuple[int, int]] = {}

    def add(block_name: str, base: int, regs: tuple[HwReg, ...]) -> None:
        ctx.base = base
        for reg in regs:
            off = base + reg.offset
            if off + reg.size > size or (reg.when and not reg.when(ctx)):
                continue
            reg_rw, reg_rw1c = mask_value(reg.rw, ctx), mask_value(reg.rw1c, ctx)
            rw[off:off + reg.size] = reg_rw.to_bytes(reg.size, "little")
            rw1c[off:off + reg.size] = reg_rw1c.to_bytes(reg.size, "little")
            fields.append(Field(f"{block_name}.{reg.name}" if block_name else reg.name,
                                off, reg.size, reg_rw, reg_rw1c))
            forced = reg.init(ctx) if reg.init else None
            if forced is not None:
                initial[off] = (reg.size, forced)
            if reg.hook:
                hooks.append((reg.hook, off, reg.size))

    header_type = cfg[HEADER_TYPE] & HEADER_TYPE_MASK
    add("", 0, HEADER_COMMON + HEADER_TABLES.get(header_type, ()))
    caps = find_capabilities(ctx.cfg)
    ctx.pcie = next((c.offset for c in caps if c.kind == "legacy" and c.cap_id == CAP_PCIE), None)
    for cap in caps:
        table = (LEGACY_CAPS if cap.kind == "legacy" else EXTENDED_CAPS).get(cap.cap_id)
        if table:
            add(f"{cap.name}@{cap.offset:#x}", cap.offset, table[1])
    return Model(size, bytes(rw), bytes(rw1c), tuple(fields), tuple(hooks), tuple(caps), initial)


def power_on_config(cfg: bytes, model: Model) -> bytes:
    """The dump's bytes with the model's forced values (e.g. unimplemented BARs read 0)."""
    out = bytearray(cfg)
    for off, (size, value) in model.initial.items():
        out[off:off + size] = value.to_bytes(size, "little")
    return bytes(out)


def reset_methods(cfg: bytes, alone_on_bus: bool) -> tuple[str, ...]:
    """The reset methods a function with config ``cfg`` offers, in the kernel's order."""
    caps = find_capabilities(cfg)
    return tuple(name for name, has in RESET_METHODS if has(cfg, caps, alone_on_bus))


# What the kernel's pci_save_state keeps and pci_restore_state writes back around a
# reset of a function no dom0 driver uses (no MSI state of its own): the header dwords
# and the PCIe control registers, by the name the model gives them.
KERNEL_SAVED_PCIE = ("devctl", "lnkctl", "sltctl", "rootctl", "devctl2", "lnkctl2")


def kernel_restore(model: Model, saved: bytes, now: bytes) -> bytes:
    """``now`` after the kernel wrote back what it saved (``saved``) around a reset:
    the PCIe control registers, then the header dwords that differ, in its order."""
    cfg = bytearray(now)

    def put(offset: int, size: int) -> None:
        want = int.from_bytes(saved[offset:offset + size], "little")
        if int.from_bytes(cfg[offset:offset + size], "little") != want:
            cfg[offset:offset + size] = model.apply(bytes(cfg), offset, size, want)

    for f in model.fields:
        if f.name.startswith("pcie@") and f.name.split(".")[-1] in KERNEL_SAVED_PCIE:
            put(f.offset, f.size)
    bridge = saved[HEADER_TYPE] & HEADER_TYPE_MASK == 1
    order = ((12, 16), (9, 12), (0, 9)) if bridge else ((10, 16), (4, 10), (0, 4))
    for first, end in order:
        for dword in reversed(range(first, end)):
            put(dword * 4, 4)
    return bytes(cfg)
