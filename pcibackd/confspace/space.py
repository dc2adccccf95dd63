"""The per-guest virtual config space of one device: the dispatcher.

Reads overlay the emulated copy on the device value using a mask precomputed
per (offset, size), so a pass-through read is one dict lookup, one list index
and one ``port.read``.  Writes are split at register boundaries (accesses are
naturally aligned, so every piece is an aligned 1/2/4-byte access) and each
piece goes through its register's hook or the generic masked write; bits no
rule lets the guest change are dropped, success is returned and the write is
counted in ``denied_writes`` (pciback-protocol.md §3.1).  Errors from a hook
stop the access at that register, as the kernel backend does.  Hooks see a
ConfSpace only as a :class:`~.spec.HookView`.  Every device access goes
through the injected :class:`~pcibackd.hostpci.port.HostPort`.
"""

from __future__ import annotations

import threading
from typing import Callable

from loguru import logger

from pcibackd.hostpci.port import HostPort
from pcibackd.wire.pciif import Err
from pcibackd.confspace import power
from pcibackd.confspace.bars import Bar
from pcibackd.confspace.header import COMMAND_EMU
from pcibackd.confspace.layout import Layout, build_layout
from pcibackd.wire.pciregs import COMMAND, PM_PMC
from pcibackd.confspace.policy import DEFAULT_POLICY, DevicePolicy
from pcibackd.confspace.spec import FULL, Slot
from pcibackd.confspace.state import EmuState, decode, encode
from pcibackd.common.ratelimit import worth_logging

_OK = Err.success
_INVALID = Err.invalid_offset
_FAILED = Err.op_failed


class ConfSpace:
    """Guest view of one host function; see module doc.  Create with :meth:`build`."""

    on_change: Callable[[], None] | None

    def __init__(self, port: HostPort, policy: DevicePolicy, layout: Layout,
                 state: EmuState) -> None:
        self.port = port
        self.info = port.info
        self.policy = policy
        self.state = state
        self.on_change = None
        self._lock = threading.Lock()
        self._pread = port.read
        self._denied_in_op: Slot | None = None
        self._install(layout)

    @classmethod
    def build(cls, port: HostPort, policy: DevicePolicy | None = None,
              snapshot: bytes | None = None) -> "ConfSpace":
        """Capture the device through ``port`` and, if given, continue from ``snapshot``.

        A snapshot that does not validate is logged once and ignored.
        Raises ``UnsupportedDevice`` for header types other than 0/1.
        """
        policy = policy or DEFAULT_POLICY
        layout = build_layout(port, policy)
        state = EmuState(command=port.read(COMMAND, 2) & COMMAND_EMU)
        if snapshot is not None:
            try:
                state = decode(snapshot, port.info, COMMAND_EMU, set(layout.bars))
            except ValueError as exc:
                logger.warning("{}: config-space snapshot rejected ({}); starting from the "
                               "captured state", port.info.bdf, exc)
        return cls(port, policy, layout, state)

    def _install(self, layout: Layout) -> None:
        """Make ``layout`` current and lay the guest state over its initial values."""
        vconfig = bytearray(layout.initial)
        vconfig[COMMAND:COMMAND + 2] = self.state.command.to_bytes(2, "little")
        for offset in self.state.sizing:
            vconfig[offset:offset + 4] = layout.bars[offset].size_val.to_bytes(4, "little")
        self.layout = layout
        self._config_size = layout.config_size
        self._owner = layout.owner
        # One attribute, swapped atomically, so a lock-free read never mixes two layouts.
        self._tables = (layout.read_masks, vconfig)

    # -- run-time knobs ----------------------------------------------------------

    @property
    def permissive(self) -> bool:
        """Permissive mode: the run-time override if set, else the policy's."""
        override = self.state.permissive_override
        return self.policy.permissive if override is None else override

    @permissive.setter
    def permissive(self, value: bool | None) -> None:
        self.state.permissive_override = None if value is None else bool(value)
        self._notify()

    @property
    def allow_interrupt_control(self) -> bool:
        """Whether the guest may toggle INTx disable and MSI/MSI-X enable."""
        return self.state.allow_interrupt_control

    @allow_interrupt_control.setter
    def allow_interrupt_control(self, value: bool) -> None:
        self.state.allow_interrupt_control = bool(value)
        self._notify()

    @property
    def denied_writes(self) -> int:
        """Guest writes (accesses) of which some part was dropped or refused."""
        return self.state.denied_writes

    @denied_writes.setter
    def denied_writes(self, value: int) -> None:
        self.state.denied_writes = int(value)

    def set_policy(self, policy: DevicePolicy) -> None:
        """Replace the policy (reload): rebuild the layout, keep the guest's state."""
        layout = build_layout(self.port, policy)
        with self._lock:
            self.policy = policy
            self._install(layout)

    def snapshot(self) -> bytes:
        """The emulated state, for :meth:`build` after a worker restart."""
        with self._lock:
            return encode(self.state, self.info)

    def _notify(self) -> None:
        callback = self.on_change
        if callback is not None:
            try:
                callback()
            except Exception:                               # noqa: BLE001 - never fail the guest op
                logger.exception("{}: on_change callback failed", self.info.bdf)

    # -- guest accesses ------------------------------------------------------------

    def read(self, untrusted_offset: int, untrusted_size: int) -> tuple[int, int]:
        """Guest config read: (XEN_PCI_ERR_*, value)."""
        if (type(untrusted_offset) is not int or type(untrusted_size) is not int
                or not 0 <= untrusted_offset < self._config_size):
            return _INVALID, 0
        masks, vconfig = self._tables
        table = masks.get(untrusted_size)
        if table is None:
            return _INVALID, 0
        mask = table[untrusted_offset]
        if mask is None:
            return _INVALID, 0
        try:
            if mask == 0:
                return _OK, self._pread(untrusted_offset, untrusted_size)
            emu = int.from_bytes(vconfig[untrusted_offset:untrusted_offset + untrusted_size],
                                 "little")
            if mask == FULL[untrusted_size]:
                return _OK, emu
            return _OK, (self._pread(untrusted_offset, untrusted_size) & ~mask) | emu
        except OSError as exc:
            logger.debug("{}: config read failed: {}", self.info.bdf, exc)
            return _FAILED, 0

    def write(self, untrusted_offset: int, untrusted_size: int, untrusted_value: int) -> int:
        """Guest config write: XEN_PCI_ERR_*."""
        if (type(untrusted_offset) is not int or type(untrusted_size) is not int
                or type(untrusted_value) is not int or untrusted_size not in FULL
                or untrusted_offset % untrusted_size
                or not 0 <= untrusted_offset <= self._config_size - untrusted_size):
            return _INVALID
        offset, size = untrusted_offset, untrusted_size
        value = untrusted_value & FULL[size]       # the wire carries 32 bits; use the low bytes
        with self._lock:
            before = self.state.key()
            self._denied_in_op = None
            try:
                err = self._write(offset, size, value)
            except OSError as exc:
                logger.warning("{}: config write {:#x}/{} failed: {}", self.info.bdf, offset,
                               size, exc)
                err = _FAILED
            denied, self._denied_in_op = self._denied_in_op, None
            if denied is not None:
                self._count_denied(denied, offset, size)
            changed = self.state.key() != before
        if changed:
            self._notify()
        return err

    def _write(self, offset: int, size: int, value: int) -> int:
        end = offset + size
        pos = offset
        owner = self._owner
        # As in Linux, an access that touches a register with a rule is handled by the rules
        # alone: permissive mode passes only accesses made entirely of unruled registers (a
        # dword read-modify-write of COMMAND must not clear STATUS's RW1C bits).
        passthrough = self.permissive and not any(owner[p].reg.strict for p in range(pos, end))
        while pos < end:
            slot = owner[pos]
            stop = min(slot.offset + slot.size, end)
            piece = (value >> (8 * (pos - offset))) & FULL[stop - pos]
            err = self._write_piece(slot, pos, stop - pos, piece, passthrough)
            if err != _OK:
                return err
            pos = stop
        return _OK

    def _write_piece(self, slot: Slot, offset: int, size: int, value: int,
                     passthrough: bool) -> int:
        reg = slot.reg
        shift = 8 * (offset - slot.offset)
        if reg.write is not None:
            written = FULL[size] << shift
            old = self.view(slot.offset, slot.size)
            # Unwritten RW1C bits merge as 0: a narrow write must not clear a status bit
            # just because it reads 1.
            new = (old & ~written & ~reg.rw1c) | (value << shift)
            return reg.write(self, slot, new, old, written)
        full = FULL[size]
        wr_hw = (slot.wr_hw | (slot.passable if passthrough else 0)) >> shift & full
        wr_emu = slot.wr_emu >> shift & full
        rw1c = reg.rw1c >> shift & full
        old = self.view(offset, size)
        # A 1 written to a set RW1C bit is a change (it would clear it).
        attempted = ((value ^ old) & ~rw1c) | (value & old & rw1c)
        if attempted & ~(wr_hw | wr_emu):
            self.note_denied(slot, attempted & ~(wr_hw | wr_emu))
        if wr_hw:
            hw = self._pread(offset, size)
            out = (hw & ~wr_hw & ~rw1c) | (value & wr_hw)
            # A register the guest fully owns is written even unchanged (writes may act).
            if wr_hw == full or (out ^ hw) & ~rw1c or out & rw1c:
                self.port.write(offset, size, out)
        if wr_emu:
            vconfig = self._tables[1]
            cur = int.from_bytes(vconfig[offset:offset + size], "little")
            cur = (cur & ~wr_emu) | (value & wr_emu)
            vconfig[offset:offset + size] = cur.to_bytes(size, "little")
        return _OK

    def _count_denied(self, slot: Slot, offset: int, size: int) -> None:
        self.state.denied_writes += 1
        count = self.state.denied_writes
        if worth_logging(count) or count % 10000 == 0:
            hint = "" if self.permissive or slot.reg.strict else " (permissive mode would allow it)"
            logger.warning("{}: guest write {:#x}/{} to {} dropped or refused{}; {} so far",
                           self.info.bdf, offset, size, slot.reg.name, hint, count)

    # -- the view hooks see (spec.HookView) ------------------------------------------

    @property
    def decode_bits(self) -> int:
        """COMMAND bits that enabling the device turns on (what its BARs decode)."""
        return self.layout.decode_bits

    def bar(self, offset: int) -> Bar:
        """The captured BAR or ROM at ``offset``."""
        return self.layout.bars[offset]

    def cap_offset(self, cap_id: int) -> int | None:
        """Offset of the first legacy capability ``cap_id`` on the device (hidden or not)."""
        return self.layout.cap_offset(cap_id)

    def set_power_state(self, pm_base: int, target: int) -> bool:
        """Move the device to D-state ``target`` through its PM capability at ``pm_base``."""
        pmc = self._pread(pm_base + PM_PMC, 2)
        return power.set_power_state(self.port, pm_base, pmc, target)

    def hw_read(self, offset: int, size: int) -> int:
        """Read the device (hooks use this, never the guest view)."""
        return self._pread(offset, size)

    def hw_write(self, offset: int, size: int, value: int) -> None:
        """Write the device on behalf of a hook that has applied its rule."""
        self.port.write(offset, size, value)

    def set_emu(self, slot: Slot, value: int) -> None:
        """Store ``value``'s emulated bits as the register's emulated copy."""
        value &= slot.reg.emu
        self._tables[1][slot.offset:slot.end] = value.to_bytes(slot.size, "little")

    def note_denied(self, slot: Slot, bits: int) -> None:
        """Record that part of the current write was dropped or refused."""
        if bits:
            self._denied_in_op = slot

    # -- the guest view ----------------------------------------------------------------

    def view(self, offset: int, size: int) -> int:
        """The guest's current view of an aligned (offset, size); no validation."""
        masks, vconfig = self._tables
        mask = masks[size][offset]
        emu = int.from_bytes(vconfig[offset:offset + size], "little") if mask else 0
        if mask == FULL[size]:
            return emu
        return (self._pread(offset, size) & ~mask) | emu

    def guest_config_dump(self) -> bytes:
        """The guest's whole view of config space (for golden tests and lspci)."""
        with self._lock:
            return b"".join(self.view(off, 4).to_bytes(4, "little")
                            for off in range(0, self._config_size, 4))

    def __repr__(self) -> str:
        return f"ConfSpace({self.info.bdf}, type {self.layout.header_type})"
