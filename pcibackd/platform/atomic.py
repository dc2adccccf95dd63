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


class PageBits:
    """``test_bit``/``set_bit``/``clear_bit`` of the SharedPage protocol, for a
    page mapped at ``self._bit_base`` (None once closed).  Like Linux's bitops,
    bit numbers past 31 continue into later words; offsets are word-aligned."""

    _bit_base: int | None
    _PAGE = 4096

    def _word(self, offset: int, bit: int) -> tuple[int, int]:
        base = self._bit_base
        if base is None:
            raise ValueError("shared page is closed")
        word = offset + 4 * (bit >> 5)
        if offset % 4 or bit < 0 or not 0 <= word <= self._PAGE - 4:
            raise ValueError(f"bad bit address offset={offset} bit={bit}")
        return base + word, bit & 31

    def test_bit(self, offset: int, bit: int) -> bool:
        address, bit = self._word(offset, bit)
        return bool(load(address) >> bit & 1)

    def set_bit(self, offset: int, bit: int) -> bool:
        return set_bit(*self._word(offset, bit))

    def clear_bit(self, offset: int, bit: int) -> bool:
        return clear_bit(*self._word(offset, bit))
