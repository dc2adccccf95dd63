"""Giving a function back in the state it was seized in.

Like xen-pciback, which saves a function's state when it takes the device and
on every release resets the function and restores that saved state: pcibackd
captures the state when a device is first exported (:func:`capture_state`) and,
when it leaves its guest, resets it with the best method it has
(:mod:`pcibackd.hostpci.reset`) and writes back every register that now
differs (:func:`restore_state`), in the order of the kernel's restore:

1. power state D0 first (a D3hot -> D0 transition may itself reset the function);
2. PCIe Device Control, Link Control and their "2" registers, as seized;
3. the header: BARs, ROM (address as seized, decoding off), interrupt line,
   cache line and latency, COMMAND last, so decoding is only switched back on
   once the addresses are right.  COMMAND is left as xen-pciback leaves it
   after its restore (it disables the function again): Bus Master off, so a
   function nobody drives does no DMA until a dom0 driver enables it; INTx
   enabled, since message interrupts are off;
4. MSI and MSI-X disabled (a guest killed abruptly leaves them on): MSI's
   per-vector mask bits set where it has them; MSI-X's Enable and Function
   Mask both clear, their power-on values (its per-vector masks are in the
   MSI-X table, outside config space).  Xen 4.17 refuses to assign a function
   whose MSI-X Function Mask is set (EBUSY, seen on the real-Xen lane), so a
   set mask would keep the function from its next guest.

A function without a reset method (QEMU's edu and pci-testdev) therefore still
gets all of this back.  Every register written is one the kernel's
pci_restore_state writes too; nothing else is touched.

The same reset and restore run when the daemon first takes a function from
dom0 (:func:`seize_function`), as xen-pciback does when its stub claims a
device: the first guest never starts with what dom0's driver left behind.

A function whose reset failed, at seize or at release, is quarantined
(:func:`pcibackd.hostpci.records.quarantine`): the daemon does not give it to a guest until an
administrator clears it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

from pcibackd.hostpci.port import find_capability
from pcibackd.hostpci.reset import ResetResult, reset_function
from pcibackd.hostpci.seize import quiesce_command
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciregs import (CAP_MSI, CAP_MSIX, CAP_PCIE, CAP_PM, COMMAND_INTX_DISABLE, D0, HEADER_TYPE_MASK,
                                   MSI_64BIT,
                                   MSI_ENABLE, MSI_FLAGS, MSI_MASKABLE, MSIX_ENABLE, MSIX_FLAGS, MSIX_MASKALL,
                                   PM_CTRL, PMCSR_PME_STATUS, PMCSR_STATE, ROM_ENABLE)

HEADER_SIZE = 64

# (offset, size) written back for a type 0 header, in pci_restore_state's
# order: BARs, ROM and INTx line first, command last.  Single bytes where the
# dword also holds something that must not be written (BIST at 0x0F starts a
# self-test; 0x3D-0x3F are read-only).
RESTORE_TYPE0 = ((0x3C, 1), (0x30, 4), (0x24, 4), (0x20, 4), (0x1C, 4), (0x18, 4), (0x14, 4),
                 (0x10, 4), (0x0D, 1), (0x0C, 1), (0x04, 2))
# other header types (bridges): only what every header type has at these offsets
RESTORE_OTHER = ((0x3C, 1), (0x0D, 1), (0x0C, 1), (0x04, 2))
ROM_TYPE0 = 0x30

_DECODE = 0x7            # COMMAND: I/O, memory, bus master

# PCI Express capability registers saved at seize (PCIe Base 4.0 §7.5.3), as
# pci_save_pcie_state saves them: name -> (offset in the capability, needs a link, needs version 2)
PCIE_FLAGS = 2
PCIE_SAVED = {"devctl": (0x08, False, False), "lnkctl": (0x10, True, False),
              "devctl2": (0x28, False, True), "lnkctl2": (0x30, True, True)}
PCIE_NO_LINK = (0x9, 0xA)        # root complex integrated endpoint, event collector
PCIE_PCIE_TO_PCI = 0x7
DEVCTL_BCR_FLR = 0x8000          # Initiate FLR, except on a PCIe-to-PCI bridge
MSI_MME = 0x0070                 # Multiple Message Enable
STATE_FORMAT = 2


def _is_virtfn(port) -> bool:
    info = getattr(port, "info", None)
    return bool(getattr(info, "is_virtfn", False))


def _identity(port) -> int:
    """Vendor and device ID as one dword: the kernel's for an SR-IOV VF (whose registers
    read 0xffff by design), the registers' otherwise."""
    if _is_virtfn(port):
        return port.info.device << 16 | port.info.vendor
    return port.read(0x00, 4)


def _check_answers(port, ids: int) -> None:
    # A VF's IDs say nothing: its class/revision dword does (all-ones when it is gone).
    probe = port.read(0x08, 4) if _is_virtfn(port) else ids & 0xFFFF
    if probe in (0xFFFF, 0xFFFFFFFF):
        raise ValueError("the function does not answer config reads (they return 0xffff...)")


def capture_header(port) -> bytes:
    """The first 64 bytes of config space, read dword by dword (a VF's IDs: the kernel's).

    ValueError when the function does not answer (gone, or in D3cold): such a
    capture, restored later, would write all-ones everywhere."""
    ids = _identity(port)
    _check_answers(port, ids)
    return ids.to_bytes(4, "little") + b"".join(
        port.read(off, 4).to_bytes(4, "little") for off in range(4, HEADER_SIZE, 4))


@dataclass(frozen=True)
class SavedState:
    """What :func:`restore_state` puts back: the header and the PCIe control registers."""

    header: bytes
    pcie: tuple[tuple[str, int, int], ...] = ()     # (name, absolute offset, 16-bit value)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "header": self.header.hex(),
                           "pcie": [list(r) for r in self.pcie]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SavedState":
        """Inverse of :meth:`to_bytes`; a bare 64-byte header (an older daemon's) is a header only.
        ValueError when it is neither."""
        if len(data) == HEADER_SIZE:
            return cls(bytes(data))
        try:
            d = json.loads(data)
            if d.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown saved-state format {d.get('format')!r}")
            pcie = tuple((str(n), int(o), int(v)) for n, o, v in d["pcie"])
            return cls(bytes.fromhex(d["header"]), pcie)
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable saved state: {exc}") from None


def _pcie_registers(port) -> list[tuple[str, int]]:
    """(name, absolute offset) of the PCIe control registers this function implements."""
    cap = find_capability(port.read, CAP_PCIE)
    if cap is None:
        return []
    flags = port.read(cap + PCIE_FLAGS, 2)
    version, kind = flags & 0xF, (flags >> 4) & 0xF
    return [(name, cap + off) for name, (off, link, v2) in PCIE_SAVED.items()
            if not (link and kind in PCIE_NO_LINK) and not (v2 and version < 2)]


def capture_state(port) -> SavedState:
    """The seize-time state of ``port`` (ValueError when it does not answer)."""
    header = capture_header(port)
    return SavedState(header, tuple((name, off, port.read(off, 2)) for name, off in _pcie_registers(port)))


def released_command(command: int, header_type: int) -> int:
    """COMMAND as a release leaves it: :func:`quiesce_command`, and INTx enabled on a
    type-0 function (its MSI/MSI-X are off, as pci_disable_msi re-enables INTx)."""
    command = quiesce_command(command, header_type)
    return command & ~COMMAND_INTX_DISABLE if header_type & HEADER_TYPE_MASK == 0 else command


def _wanted(saved: bytes, offset: int, size: int) -> int:
    value = int.from_bytes(saved[offset:offset + size], "little")
    if offset == 0x04:
        return released_command(value, saved[0x0E])
    if offset == ROM_TYPE0:
        return value & ~ROM_ENABLE           # the address back, its decoding off
    return value


def _check_mine(port, saved: bytes) -> None:
    if len(saved) != HEADER_SIZE:
        raise ValueError(f"saved header is {len(saved)} bytes, not {HEADER_SIZE}")
    now_ids, now_type = _identity(port), port.read(0x0E, 1) & 0x7F
    _check_answers(port, now_ids)
    if now_ids != int.from_bytes(saved[0:4], "little") or now_type != saved[0x0E] & 0x7F:
        raise ValueError(f"saved header (ids {saved[0:4].hex()}) is not this function's (ids {now_ids:08x})")


def restore_header(port, saved: bytes) -> list[int]:
    """Write back the registers of ``saved`` (from :func:`capture_header`) that
    differ from the hardware now; returns the offsets written.

    ValueError, and nothing written, when ``saved`` is not this function's
    (vendor/device ID or header type differ: the address was reused)."""
    _check_mine(port, saved)
    return _restore_header(port, saved)


def _restore_header(port, saved: bytes) -> list[int]:
    table = RESTORE_TYPE0 if saved[0x0E] & 0x7F == 0 else RESTORE_OTHER
    todo = [(offset, size, want) for offset, size in table
            if port.read(offset, size) != (want := _wanted(saved, offset, size))]
    command = port.read(0x04, 2)
    if command & _DECODE and any(0x10 <= offset <= 0x30 for offset, _, _ in todo):
        # decoding off while BARs change: a half-written 64-bit BAR must not decode anywhere
        port.write(0x04, 2, command & ~_DECODE)
        if all(offset != 0x04 for offset, _, _ in todo):
            todo.append((0x04, 2, command))
    for offset, size, want in todo:
        port.write(offset, size, want)
    return [offset for offset, _, _ in todo]


def _put(port, offset: int, size: int, want: int, done: list[str], name: str) -> None:
    if port.read(offset, size) != want:
        port.write(offset, size, want)
        done.append(name)


def _power_on(port, done: list[str]) -> None:
    pm = find_capability(port.read, CAP_PM)
    if pm is not None:
        pmcsr = port.read(pm + PM_CTRL, 2)
        if pmcsr & PMCSR_STATE != D0:
            # PME_Status is write-1-to-clear: written as 0, it stays for whoever looks next
            _put(port, pm + PM_CTRL, 2, pmcsr & ~(PMCSR_STATE | PMCSR_PME_STATUS) | D0, done, "pm")


def _restore_pcie(port, saved: SavedState, done: list[str]) -> None:
    cap = find_capability(port.read, CAP_PCIE)
    bridge = cap is not None and (port.read(cap + PCIE_FLAGS, 2) >> 4) & 0xF == PCIE_PCIE_TO_PCI
    implemented = dict(_pcie_registers(port))
    for name, offset, value in saved.pcie:
        if implemented.get(name) != offset:
            continue                         # the capability moved: not this layout's register
        if name == "devctl" and not bridge:
            value &= ~DEVCTL_BCR_FLR         # never start an FLR by restoring
        _put(port, offset, 2, value, done, f"pcie.{name}")


def _messages_off(port, done: list[str]) -> None:
    msi = find_capability(port.read, CAP_MSI)
    if msi is not None:
        control = port.read(msi + MSI_FLAGS, 2)
        _put(port, msi + MSI_FLAGS, 2, control & ~(MSI_ENABLE | MSI_MME), done, "msi.control")
        if control & MSI_MASKABLE:
            vectors = 1 << min((control >> 1) & 0x7, 5)
            mask_at = msi + (0x10 if control & MSI_64BIT else 0x0C)
            _put(port, mask_at, 4, (1 << vectors) - 1, done, "msi.mask")
    msix = find_capability(port.read, CAP_MSIX)
    if msix is not None:
        control = port.read(msix + MSIX_FLAGS, 2)
        _put(port, msix + MSIX_FLAGS, 2, control & ~(MSIX_ENABLE | MSIX_MASKALL), done, "msix.control")


def restore_state(port, saved: SavedState) -> list[str]:
    """Put ``port`` back as :func:`capture_state` found it (see the module docstring for the
    order and the exceptions); returns the names of the registers written.

    ValueError, and nothing written, when ``saved`` is not this function's."""
    _check_mine(port, saved.header)
    done: list[str] = []
    _power_on(port, done)
    _restore_pcie(port, saved, done)
    done += [f"header.{offset:#04x}" for offset in _restore_header(port, saved.header)]
    if saved.header[0x0E] & 0x7F == 0:
        _messages_off(port, done)            # as xen-pciback: type-0 functions only
    return done


# --- the release of one function and its record --------------------------------------

@dataclass(frozen=True)
class ReleaseRecord:
    """How a function's last reset went (``event``: "release", or "seize" when the daemon took
    it from dom0): the reset (method, result) and the restore."""

    bdf: str
    method: str                  # the reset method ("none": the function has none)
    reset_ok: bool
    detail: str = ""             # why the reset failed
    restored: tuple[str, ...] = ()   # registers written back
    restore_error: str = ""      # why the saved state was not restored ("" when it was)
    keep_saved: bool = False     # the restore failed for I/O: the saved state stays for the next release
    when: float = field(default_factory=time.time)
    event: str = "release"       # "seize" | "release"

    @property
    def result(self) -> str:
        return "ok" if self.reset_ok else "failed"

    def describe(self) -> str:
        text = ResetResult(self.method, self.reset_ok, self.detail).describe()
        restored = (f"not restored ({self.restore_error})" if self.restore_error
                    else f"{len(self.restored)} register(s) restored")
        return f"{'at seize: ' if self.event == 'seize' else ''}{text}; {restored}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["restored"] = list(self.restored)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ReleaseRecord":
        return cls(str(d["bdf"]), str(d["method"]), bool(d["reset_ok"]), str(d.get("detail", "")),
                   tuple(map(str, d.get("restored", ()))), str(d.get("restore_error", "")),
                   bool(d.get("keep_saved", False)), float(d.get("when", 0.0)), str(d.get("event", "release")))


def release_function(bdf: BDF, port, saved: SavedState | None, saved_error: str = "") -> ReleaseRecord:
    """Reset ``port`` and restore ``saved`` (None: nothing was saved, ``saved_error`` says why).

    OSError from the restore is recorded, not raised: a release always finishes."""
    result = reset_function(port)
    restored: list[str] = []
    error, keep = (saved_error if saved is None else ""), False
    if saved is not None:
        try:
            restored = restore_state(port, saved)
        except ValueError as exc:            # not this function's, or it does not answer
            error = str(exc)
        except OSError as exc:
            error, keep = exc.strerror or str(exc), True
    return ReleaseRecord(str(bdf), result.method, result.ok, result.detail, tuple(restored), error, keep)


def seize_function(bdf: BDF, port) -> ReleaseRecord:
    """What xen-pciback does when its stub takes a function: save its state, reset it with
    its best method, restore the saved state (MSI/MSI-X off, Bus Master off).  Never raises
    for a device error: a function that does not answer is recorded as a failed reset."""
    try:
        saved, why = capture_state(port), ""
    except ValueError as exc:
        saved, why = None, str(exc)
    except OSError as exc:
        return ReleaseRecord(str(bdf), "?", False, f"reading its config space: {exc.strerror or exc}",
                             event="seize")
    record = release_function(bdf, port, saved, why)
    if saved is None:
        # a function that does not answer config reads is not one to hand out
        record = replace(record, reset_ok=False, detail=record.detail or why)
    return replace(record, event="seize", keep_saved=False)
