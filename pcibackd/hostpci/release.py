"""Giving a function back in the state it was seized in.

Like xen-pciback, which saves a function's state when it takes the device and
on every release resets the function and restores that saved state: pcibackd
captures the standard header when a device is first exported and, when it
leaves its guest, resets it (if the function has a reset method) and writes
back every header register a guest can change that now differs.  A function
without a reset method (no FLR, no PM reset, no bus reset: QEMU's edu and
pci-testdev) therefore still gets its BARs, ROM, command and the rest back.
Not restored (yet): the power state (a function a guest left in D3hot stays
there), MSI/MSI-X enables and PCIe control registers.
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


_DECODE = 0x7            # COMMAND: I/O, memory, bus master


def capture_header(port) -> bytes:
    """The first 64 bytes of config space, read dword by dword.

    ValueError when the function does not answer (vendor 0xFFFF: gone, or in
    D3cold): such a capture, restored later, would write all-ones everywhere."""
    header = b"".join(port.read(off, 4).to_bytes(4, "little") for off in range(0, HEADER_SIZE, 4))
    if header[0:2] == b"\xff\xff":
        raise ValueError("the function does not answer config reads (vendor ID 0xffff)")
    return header


def restore_header(port, saved: bytes) -> list[int]:
    """Write back the registers of ``saved`` (from :func:`capture_header`) that
    differ from the hardware now; returns the offsets written.

    ValueError, and nothing written, when ``saved`` is not this function's
    (vendor/device ID or header type differ: the address was reused)."""
    if len(saved) != HEADER_SIZE:
        raise ValueError(f"saved header is {len(saved)} bytes, not {HEADER_SIZE}")
    now_ids, now_type = port.read(0x00, 4), port.read(0x0E, 1) & 0x7F
    if now_ids != int.from_bytes(saved[0:4], "little") or now_type != saved[0x0E] & 0x7F:
        raise ValueError(f"saved header (ids {saved[0:4].hex()}) is not this function's (ids {now_ids:08x})")
    table = RESTORE_TYPE0 if saved[0x0E] & 0x7F == 0 else RESTORE_OTHER
    todo = [(offset, size, want) for offset, size in table
            if port.read(offset, size) != (want := int.from_bytes(saved[offset:offset + size], "little"))]
    command = port.read(0x04, 2)
    if command & _DECODE and any(0x10 <= offset <= 0x30 for offset, _, _ in todo):
        # decoding off while BARs change: a half-written 64-bit BAR must not decode anywhere
        port.write(0x04, 2, command & ~_DECODE)
        if all(offset != 0x04 for offset, _, _ in todo):
            todo.append((0x04, 2, command))
    for offset, size, want in todo:
        port.write(offset, size, want)
    return [offset for offset, _, _ in todo]
