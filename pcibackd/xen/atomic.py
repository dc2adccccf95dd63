"""Real atomic read-modify-write on 32-bit words of a shared page.

The frontend sets and the backend clears bits of ``xen_pci_sharedinfo.flags``
concurrently, so a Python read-modify-write could lose the other side's bit.
libatomic's out-of-line ``__atomic_fetch_{and,or}_4`` are lock-prefixed
instructions on x86 and full barriers (SEQ_CST), which also orders the
preceding writes of ``err``/``value`` before the flag clear.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_SEQ_CST = 5

_lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
_fetch_and = _lib.__atomic_fetch_and_4
_fetch_or = _lib.__atomic_fetch_or_4
_load = _lib.__atomic_load_4
for _f in (_fetch_and, _fetch_or):
    _f.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
    _f.restype = ctypes.c_uint32
_load.argtypes = (ctypes.c_void_p, ctypes.c_int)
_load.restype = ctypes.c_uint32


def buffer_address(buf) -> tuple[int, object]:
    """Address of a writable buffer (mmap, bytearray) and the ctypes export
    that keeps it pinned; drop the export before closing the mmap."""
    anchor = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(anchor), anchor


def fetch_and(address: int, mask: int) -> int:
    """Atomically ``*address &= mask``; returns the old value."""
    return _fetch_and(address, mask, _SEQ_CST)


def fetch_or(address: int, mask: int) -> int:
    """Atomically ``*address |= mask``; returns the old value."""
    return _fetch_or(address, mask, _SEQ_CST)


def load(address: int) -> int:
    """Sequentially consistent 32-bit load."""
    return _load(address, _SEQ_CST)


def clear_bit(address: int, bit: int) -> bool:
    """Atomically clear ``bit``; True if it was set."""
    return bool(_fetch_and(address, ~(1 << bit) & 0xFFFFFFFF, _SEQ_CST) & (1 << bit))


def set_bit(address: int, bit: int) -> bool:
    """Atomically set ``bit``; True if it was already set."""
    return bool(_fetch_or(address, 1 << bit, _SEQ_CST) & (1 << bit))
