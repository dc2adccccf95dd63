"""The real platform layer (libxengnttab/libxenevtchn by ctypes) and platform choice.

Without Xen: the libraries load with typed signatures, every entry point fails
with a clear PlatformError when /dev/xen is absent, the page and event-channel
logic works over fakes, and choose_platform picks as documented.  In a Xen
dom0 (the lane runs this file there) the ``xen`` tests grant a page to dom0
itself, map it, and loop an event channel back to itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select

import pytest

from pcibackd.platform import xen as real
from pcibackd.platform import select as platform_select
from pcibackd.platform.api import EventChannel, Platform, PlatformError, SharedPage

IN_XEN = all(os.path.exists(p) for p in real.DEVICES.values())
xen_only = pytest.mark.skipif(not IN_XEN, reason="needs a Xen dom0 (/dev/xen/gntdev, gntalloc, evtchn)")


def _loadable(kind: str) -> bool:
    try:
        real.load_library(kind)
        return True
    except PlatformError:
        return False


needs_libs = pytest.mark.skipif(not (_loadable("gnttab") and _loadable("evtchn")),
                                reason="libxengnttab1/libxenevtchn1 not installed")


@pytest.fixture
def no_xen(monkeypatch, tmp_path):
    """Point the device checks at paths that do not exist, Xen or not."""
    monkeypatch.setattr(real, "DEVICES", {k: str(tmp_path / "dev-xen" / os.path.basename(v)) for k, v in real.DEVICES.items()})


# ---------------------------------------------------------------- libraries

@needs_libs
@pytest.mark.parametrize("kind", ["gnttab", "evtchn"])
def test_libraries_load_with_declared_signatures(kind):
    lib = real.load_library(kind)
    soname, _package, functions = real._LIBS[kind]
    assert lib._name == soname
    for name, (restype, argtypes) in functions.items():
        fn = getattr(lib, name)
        assert fn.restype is restype, name
        assert list(fn.argtypes) == list(argtypes), name
    # pointers must not be truncated to int: the handle and map results are void *
    if kind == "gnttab":
        assert lib.xengnttab_open.restype is ctypes.c_void_p
        assert lib.xengnttab_map_grant_ref.restype is ctypes.c_void_p


def test_missing_library_is_a_platform_error(monkeypatch):
    monkeypatch.setitem(real._LIBS, "evtchn", ("libxen-does-not-exist.so.9", "libxen-nope1", {}))
    monkeypatch.setattr(real, "_loaded", {})
    with pytest.raises(PlatformError) as info:
        real.load_library("evtchn")
    assert info.value.errno == errno.ENOENT
    assert "libxen-nope1" in str(info.value)


# ---------------------------------------------------------------- no /dev/xen

@needs_libs
def test_map_grant_without_xen_raises_enoent(no_xen):
    p = real.RealPlatform()
    with pytest.raises(PlatformError) as info:
        p.map_grant(1, 8)
    assert info.value.errno == errno.ENOENT
    assert "gntdev" in str(info.value)


@needs_libs
def test_open_evtchn_without_xen_raises_enoent(no_xen):
    with pytest.raises(PlatformError) as info:
        real.RealPlatform().open_evtchn()
    assert info.value.errno == errno.ENOENT
    assert "evtchn" in str(info.value)


@needs_libs
def test_grant_page_without_xen_raises_enoent(no_xen):
    with pytest.raises(PlatformError) as info:
        real.RealPlatform().grant_page(0)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("domid", [-1, 0x7FF0, 0xFFFF])
def test_bad_domid_is_einval_before_touching_xen(no_xen, domid):
    p = real.RealPlatform()
    with pytest.raises(PlatformError) as info:
        p.map_grant(domid, 8)
    assert info.value.errno == errno.EINVAL


def test_bad_gref_is_einval(no_xen):
    with pytest.raises(PlatformError) as info:
        real.RealPlatform().map_grant(1, 1 << 32)
    assert info.value.errno == errno.EINVAL


def test_end_grant_of_unknown_gref_is_enoent():
    with pytest.raises(PlatformError) as info:
        real.RealPlatform().end_grant(12345)
    assert info.value.errno == errno.ENOENT


def test_platform_error_is_an_oserror():
    e = PlatformError(errno.EBADF, "x")
    assert isinstance(e, OSError) and e.errno == errno.EBADF


# ---------------------------------------------------------------- MappedPage over plain memory

@pytest.fixture
def page():
    memory = (ctypes.c_ubyte * real.PAGE_SIZE)()
    released = []
    pg = real.MappedPage(ctypes.addressof(memory), released.append)
    yield pg, memory, released
    pg.close()


def test_page_is_a_shared_page_and_buf_aliases_memory(page):
    pg, memory, _ = page
    assert isinstance(pg, SharedPage)
    assert len(pg.buf) == real.PAGE_SIZE and not pg.buf.readonly
    pg.buf[100] = 0xAB
    assert memory[100] == 0xAB
    memory[4] = 0x7F
    assert pg.buf[4] == 0x7F


def test_page_bit_ops_are_atomic_rmw_on_the_word(page):
    pg, memory, _ = page
    memory[0] = 0b0110            # the frontend's AER-handler bit and another bit already set
    assert pg.set_bit(0, 0) is False
    assert memory[0] == 0b0111 and pg.test_bit(0, 0)
    assert pg.clear_bit(0, 0) is True
    assert memory[0] == 0b0110                       # the neighbours survive
    assert pg.clear_bit(0, 0) is False
    assert pg.test_bit(0, 1) and not pg.test_bit(0, 0)


def test_page_bits_past_31_continue_into_later_words(page):
    pg, memory, _ = page
    pg.set_bit(0, 33)
    assert memory[4] == 0b10 and memory[0] == 0


@pytest.mark.parametrize("offset,bit", [(2, 0), (-4, 0), (real.PAGE_SIZE, 0), (real.PAGE_SIZE - 4, 32), (0, -1)])
def test_page_rejects_bad_bit_addresses(page, offset, bit):
    pg, _, _ = page
    with pytest.raises(ValueError):
        pg.set_bit(offset, bit)


def test_page_close_releases_views_then_unmaps_once(page):
    pg, memory, released = page
    pg.close()
    pg.close()
    assert released == [ctypes.addressof(memory)]
    with pytest.raises(ValueError):
        pg.buf[0]
    with pytest.raises(ValueError):
        pg.test_bit(0, 0)


# ---------------------------------------------------------------- event channel over a fake library

class _FakeEvtchnLib:
    """Stands in for libxenevtchn: pending() reads a scripted queue."""

    def __init__(self, script):
        self.script = list(script)
        self.unmasked = []

    def xenevtchn_pending(self, ptr):
        result, err = self.script.pop(0)
        ctypes.set_errno(err)
        return result

    def xenevtchn_unmask(self, ptr, port):
        self.unmasked.append(port)
        ctypes.set_errno(0)
        return 0

    def xenevtchn_notify(self, ptr, port):
        ctypes.set_errno(errno.EINVAL)
        return -1

    def xenevtchn_close(self, ptr):
        return 0


def _fake_channel(script):
    ch = object.__new__(real.RealEventChannel)
    h = object.__new__(real._Handle)
    h.ptr, h.pid = 1, os.getpid()
    h._closer = lambda ptr: 0
    ch._h, ch._lib, ch._fd = h, _FakeEvtchnLib(script), -1
    return ch


def test_pending_is_non_blocking_none_then_port():
    ch = _fake_channel([(-1, errno.EAGAIN), (7, 0)])
    assert ch.pending() is None
    assert ch.pending() == 7
    ch.unmask(7)
    assert ch._lib.unmasked == [7]


def test_pending_error_other_than_eagain_raises():
    ch = _fake_channel([(-1, errno.EFAULT)])
    with pytest.raises(PlatformError) as info:
        ch.pending()
    assert info.value.errno == errno.EFAULT


def test_failed_call_carries_errno_and_closed_handle_is_ebadf():
    ch = _fake_channel([])
    with pytest.raises(PlatformError) as info:
        ch.notify(3)
    assert info.value.errno == errno.EINVAL and "xenevtchn_notify(3)" in str(info.value)
    ch.close()
    with pytest.raises(PlatformError) as info:
        ch.notify(3)
    assert info.value.errno == errno.EBADF


def test_handle_of_another_process_is_refused():
    ch = _fake_channel([(5, 0)])
    ch._h.pid = os.getpid() + 1
    with pytest.raises(PlatformError) as info:
        ch.pending()
    assert info.value.errno == errno.EBADF


# ---------------------------------------------------------------- choose_platform

def test_default_is_xen_on_xen_and_never_the_simulation(tmp_path):
    with pytest.raises(platform_select.NotADom0, match="not a Xen dom0"):
        platform_select.default_spec((str(tmp_path / "nope"),))
    (tmp_path / "xen").mkdir()
    assert platform_select.default_spec((str(tmp_path / "nope"), str(tmp_path / "xen"))) == "xen"


def test_xen_platform_off_xen_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(platform_select, "XEN_MARKERS", (str(tmp_path / "proc-xen"),))
    with pytest.raises(PlatformError, match="not running on Xen"):
        platform_select.choose_platform("xen")
    (tmp_path / "proc-xen").mkdir()
    p = platform_select.choose_platform("xen")
    assert isinstance(p, real.RealPlatform) and p.name == "xen" and p.domid == 0
    assert isinstance(p, Platform)


def test_sim_by_spec(tmp_path):
    p = platform_select.choose_platform(f"sim:{tmp_path}", domid=3)
    assert p.name == "sim" and p.domid == 3 and isinstance(p, Platform)
    assert platform_select.platform_module(f"sim:{tmp_path}") == "simdom0.platform"


def test_unknown_name_or_sim_without_dir_is_an_error():
    with pytest.raises(ValueError, match="unknown platform 'kvm'"):
        platform_select.choose_platform("kvm")
    with pytest.raises(ValueError, match="sim:DIR"):
        platform_select.choose_platform("sim")


# ---------------------------------------------------------------- real Xen (the lane's dom0)

def _wait_pending(ch: EventChannel, timeout: float = 5.0) -> int | None:
    """Poll the handle's fd for up to ``timeout`` seconds, then read one port."""
    ready, _, _ = select.select([ch.fileno()], [], [], timeout)
    return ch.pending() if ready else None


@xen_only
def test_xen_event_channel_loops_back_to_dom0():
    with real.RealPlatform(0).open_evtchn() as a, real.RealPlatform(0).open_evtchn() as b:
        unbound = a.alloc_unbound(0)
        local = b.bind_interdomain(0, unbound)
        assert unbound != local
        assert a.pending() is None
        b.notify(local)
        assert _wait_pending(a) == unbound
        # masked until unmasked: a second notify is latched, not delivered twice
        b.notify(local)
        assert a.pending() is None
        a.unmask(unbound)
        assert _wait_pending(a) == unbound
        a.unmask(unbound)
        b.unbind(local)
        a.unbind(unbound)


@xen_only
def test_xen_grant_to_self_then_map_and_flip_flags():
    p = real.RealPlatform(0)
    try:
        gref, shared = p.grant_page(0)
        mapped = p.map_grant(0, gref)
        shared.buf[8:12] = b"lane"
        assert bytes(mapped.buf[8:12]) == b"lane"      # the same machine page
        shared.set_bit(0, 0)
        assert mapped.clear_bit(0, 0) is True
        assert not shared.test_bit(0, 0)
        mapped.close()
        p.end_grant(gref)
        assert shared.closed
    finally:
        p.close()


@xen_only
def test_xen_map_of_a_bogus_grant_fails_with_errno():
    p = real.RealPlatform(0)
    try:
        with pytest.raises(PlatformError) as info:
            p.map_grant(0x7FEE, 1)          # no such domain
        assert info.value.errno != 0
    finally:
        p.close()
