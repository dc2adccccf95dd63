"""Giving a function back in the state it was seized in.

Like xen-pciback, which saves a function's state when it takes the device and
on every release resets the function and restores that saved state: pcibackd
captures the standard header when a device is first exported and, when it
leaves its guest, resets it (if the function has a reset method) and writes
back every header register a guest can change that now differs.  A function
without a reset method (no FLR, no PM reset, no bus reset: QEMU's edu and
pci-testdev) therefore still gets its BARs, ROM, command and the rest back.
"""

from __future__ import annotations

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


def capture_header(port) -> bytes:
    """The first 64 bytes of config space, read dword by dword."""
    return b"".join(port.read(off, 4).to_bytes(4, "little") for off in range(0, HEADER_SIZE, 4))


def restore_header(port, saved: bytes) -> list[int]:
    """Write back the registers of ``saved`` (from :func:`capture_header`) that
    differ from the hardware now; returns the offsets written."""
    if len(saved) != HEADER_SIZE:
        raise ValueError(f"saved header is {len(saved)} bytes, not {HEADER_SIZE}")
    table = RESTORE_TYPE0 if saved[0x0E] & 0x7F == 0 else RESTORE_OTHER
    written = []
    for offset, size in table:
        want = int.from_bytes(saved[offset:offset + size], "little")
        if port.read(offset, size) != want:
            port.write(offset, size, want)
            written.append(offset)
    return written
