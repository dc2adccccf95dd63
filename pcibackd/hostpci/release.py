"""Giving a function back in the state it was seized in.

Like xen-pciback, which saves a function's state when it takes the device and
on every release resets the function and restores that saved state: pcibackd
captures the standard header when a device is first exported and, when it
leaves its guest, resets it (if the function has a reset method) and writes
back every header register a guest can change that now differs.  COMMAND is
written back as xen-pciback leaves it after its restore (it disables the
function again): Bus Master off, so a function nobody drives does no DMA
until a dom0 driver binds and enables it.  A function
without a reset method (no FLR, no PM reset, no bus reset: QEMU's edu and
pci-testdev) therefore still gets its BARs, ROM, command and the rest back.
Not restored (yet): the power state (a function a guest left in D3hot stays
there), MSI/MSI-X enables and PCIe control registers.
"""

from __future__ import annotations

from pcibackd.hostpci.seize import quiesce_command

HEADER_SIZE = 64

# (offset, size) written back for a type 0 header, in pci_restore_state's
# order: BARs, ROM and INTx line first, command last, so decoding is only
# switched back on once the addresses are right.  Single bytes where the dword
# also holds something that must not be written (BIST at 0x0F starts a
# self-test; 0x3D-0x3F are read-only).
RESTORE_TYPE0 = ((0x3C, 1), (0x30, 4), (0x24, 4), (0x20, 4), (0x1C, 4), (0x18, 4), (0x14, 4),
                 (0x10, 4), (0x0D, 1), (0x0C, 1), (0x04, 2))
# other header types (bridges): only what every header type has at these offsets
RESTORE_OTHER = ((0x3C, 1), (0x0D, 1), (0x0C, 1), (0x04, 2))


_DECODE = 0x7            # COMMAND: I/O, memory, bus master


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


def _wanted(saved: bytes, offset: int, size: int) -> int:
    value = int.from_bytes(saved[offset:offset + size], "little")
    return quiesce_command(value, saved[0x0E]) if offset == 0x04 else value


def restore_header(port, saved: bytes) -> list[int]:
    """Write back the registers of ``saved`` (from :func:`capture_header`) that
    differ from the hardware now; returns the offsets written.

    ValueError, and nothing written, when ``saved`` is not this function's
    (vendor/device ID or header type differ: the address was reused)."""
    if len(saved) != HEADER_SIZE:
        raise ValueError(f"saved header is {len(saved)} bytes, not {HEADER_SIZE}")
    now_ids, now_type = _identity(port), port.read(0x0E, 1) & 0x7F
    _check_answers(port, now_ids)
    if now_ids != int.from_bytes(saved[0:4], "little") or now_type != saved[0x0E] & 0x7F:
        raise ValueError(f"saved header (ids {saved[0:4].hex()}) is not this function's (ids {now_ids:08x})")
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
