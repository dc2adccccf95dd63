"""A function leaves its guest as it was seized: reset when it can be, header restored always."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from pcibackd.common.files import write_atomic
from pcibackd.worker.devices import DeviceSet
from pcibackd.worker.ops import Dispatcher
from pcibackd.hostpci.sysfs import SysfsDevice
from pcibackd.wire.bdf import BDF
from simdom0.hostpci import SimHost
from simdom0.platform import SimPlatform
from pcibackd.hostpci.release import HEADER_SIZE, SavedState, capture_header, restore_header
from pcibackd.hostpci.records import read_records

BDF_ = BDF(0, 0x42, 3, 0)


@pytest.fixture
def host(tmp_path: Path) -> SimHost:
    return SimHost(tmp_path / "sim")


def _without_bus_master(header: bytes) -> bytes:
    """What a restore leaves: the saved header, Bus Master off (nobody drives the function)."""
    out = bytearray(header)
    out[0x04] &= ~0x04
    return bytes(out)


def _guest_scribbles(port) -> None:
    port.write(0x04, 2, 0x0000)          # decoding off
    port.write(0x10, 4, 0xFFFFFFFF)      # BAR sizing left behind
    port.write(0x0C, 1, 0x10)
    port.write(0x3C, 1, 0x05)


def test_restore_header_puts_back_what_a_guest_changed(host):
    dev = host.add("e1000e", BDF_)
    dev.write(0x04, 2, 0x0007)
    saved = capture_header(dev)
    assert len(saved) == HEADER_SIZE and saved == dev.config_bytes()[:HEADER_SIZE]
    _guest_scribbles(dev)
    assert dev.config_bytes()[:HEADER_SIZE] != saved
    dev.clear_write_log()
    written = restore_header(dev, saved)
    assert dev.config_bytes()[:HEADER_SIZE] == _without_bus_master(saved)
    assert set(written) == {0x04, 0x10, 0x0C, 0x3C}
    assert written[-1] == 0x04                          # decoding back on only once BARs are right
    assert all(r.offset != 0x0F and not (r.offset == 0x0C and r.size == 4) for r in dev.write_log())  # BIST
    assert restore_header(dev, saved) == []             # nothing differs: nothing written


def test_restore_header_rejects_a_torn_capture(host):
    dev = host.add("edu", BDF_)
    with pytest.raises(ValueError):
        restore_header(dev, capture_header(dev)[:60])


def test_sysfs_reset_without_a_reset_method_is_not_found_and_creates_nothing(host):
    host.add("edu", BDF_)
    with SysfsDevice(BDF_, root=host.root, writable=True) as dev:
        with pytest.raises(FileNotFoundError):
            dev.reset()
        assert not (dev.path / "reset").exists()
        (dev.path / "reset").write_text("")
        dev.reset()
        assert (dev.path / "reset").read_text() == "1"
    with SysfsDevice(BDF_, root=host.root) as ro, pytest.raises(PermissionError):
        ro.reset()


def test_release_without_reset_method_restores_the_seize_time_header(host, tmp_path):
    host.add("edu", BDF_)
    cfg = SimpleNamespace(policy_path=None, domid=7)
    devices = DeviceSet(cfg, dispatcher=None, platform=None, runtime=tmp_path / "run")
    with SysfsDevice(BDF_, root=host.root, writable=True) as dev:
        seized = capture_header(dev)
        write_atomic(devices._orig_path(BDF_), seized)
        _guest_scribbles(dev)
        devices._release(BDF_, dev)
        assert capture_header(dev) == seized
    assert not devices._orig_path(BDF_).exists()        # the next guest captures afresh


def test_bars_are_rewritten_with_decoding_off(host):
    dev = host.add("e1000e", BDF_)
    dev.write(0x04, 2, 0x0007)
    saved = capture_header(dev)
    dev.write(0x10, 4, 0xFFFFFFFF)                      # decoding still on, BAR moved
    dev.clear_write_log()
    assert restore_header(dev, saved) == [0x10, 0x04]
    log = [(r.offset, r.size, r.value) for r in dev.write_log()]
    assert log[0] == (0x04, 2, 0x0000) and log[-1] == (0x04, 2, 0x0003)    # off first, back on last
    assert dev.config_bytes()[:HEADER_SIZE] == _without_bus_master(saved)


def test_a_header_from_another_function_is_refused(host):
    edu, testdev = host.add("edu", BDF_), host.add("pci-testdev", BDF(0, 0x42, 4, 0))
    foreign = capture_header(testdev)
    before = edu.config_bytes()
    with pytest.raises(ValueError, match="not this function's"):
        restore_header(edu, foreign)
    assert edu.config_bytes() == before


def test_a_function_that_does_not_answer_is_not_captured():
    class Gone:
        def read(self, offset, size):
            return (1 << (8 * size)) - 1
    with pytest.raises(ValueError, match="0xffff"):
        capture_header(Gone())


# --- DeviceSet: when the seize-time header is captured, kept and used ------------------

@pytest.fixture
def simdir(tmp_path):
    return tmp_path / "simdir"


def _devices(simdir, tmp_path) -> DeviceSet:
    cfg = SimpleNamespace(policy_path=None, domid=7, topology="vpci")
    return DeviceSet(cfg, Dispatcher(), SimPlatform(simdir, 0), tmp_path / "run")


def test_header_captured_at_first_export_survives_a_worker_restart(simdir, tmp_path):
    dev = SimHost(simdir / "pci").add("e1000e", BDF_)
    pristine = capture_header(dev)
    first = _devices(simdir, tmp_path)
    first.export([(BDF_, BDF(0, 0, 0, 0))], {})
    assert SavedState.from_bytes(first._orig_path(BDF_).read_bytes()).header == pristine
    _guest_scribbles(dev)
    first.close(forget_state=False)                     # the worker dies; the guest stays
    successor = _devices(simdir, tmp_path)
    successor.export([(BDF_, BDF(0, 0, 0, 0))], {}, resume=True)
    saved = SavedState.from_bytes(successor._orig_path(BDF_).read_bytes())
    assert saved.header == pristine                     # not the guest's settings
    successor.close(forget_state=True)                  # the guest goes
    assert capture_header(dev) == _without_bus_master(pristine)
    assert not successor._orig_path(BDF_).exists()


def test_release_with_a_stale_or_missing_header_changes_nothing_and_goes_on(simdir, tmp_path):
    host = SimHost(simdir / "pci")
    dev, other = host.add("edu", BDF_), host.add("pci-testdev", BDF(0, 0x42, 4, 0))
    devices = _devices(simdir, tmp_path)
    _guest_scribbles(dev)
    scribbled = dev.config_bytes()
    write_atomic(devices._orig_path(BDF_), capture_header(other))   # the address was reused
    devices._release(BDF_, dev)
    assert not devices._orig_path(BDF_).exists()        # discarded: the next export captures afresh
    record, quarantined = read_records(devices.state_dir)[BDF_]
    assert "not this function's" in record.restore_error and not quarantined
    devices._release(BDF_, dev)                         # nothing saved at all: recorded, no exception
    record, quarantined = read_records(devices.state_dir)[BDF_]
    assert "no saved state" in record.restore_error and record.method == "none" and not quarantined
    assert dev.config_bytes() == scribbled              # edu has no reset, and nothing was restored


def test_a_function_that_does_not_answer_leaves_no_header_to_restore(simdir, tmp_path, monkeypatch):
    SimHost(simdir / "pci").add("edu", BDF_)
    from pcibackd.worker import devices as devices_mod

    def gone(port):
        raise ValueError("the function does not answer config reads (vendor ID 0xffff)")
    monkeypatch.setattr(devices_mod, "capture_state", gone)
    devices = _devices(simdir, tmp_path)
    devices.export([(BDF_, BDF(0, 0, 0, 0))], {})       # the export itself goes on
    assert not devices._orig_path(BDF_).exists()


@pytest.mark.parametrize("dump", ["e1000e", "edu", "nvme", "pci-bridge"])
def test_restore_never_turns_bus_master_on(host, dump):
    """Like xen-pciback, which disables the function again after restoring it: a guest that
    left Bus Master on, or a dom0 driver that had it on at seize, gets no DMA back for a
    function nobody drives; a bridge keeps its Bus Master but loses MWI."""
    dev = host.add(dump, BDF_)
    bridge = dev.read(0x0E, 1) & 0x7F == 1
    dev.write(0x04, 2, 0x0016)                          # memory, bus master, MWI (as dom0 had it)
    saved = capture_header(dev)
    dev.write(0x04, 2, 0x0006)                          # the guest's last word
    restore_header(dev, saved)
    command = dev.read(0x04, 2)
    if bridge:
        assert not command & 0x0010
    else:
        assert not command & 0x0004
        assert command & 0x0002                         # decoding stays as dom0 had it


# --- SR-IOV virtual functions: the kernel's identity, not the 0xffff registers ------------

PF_, VF_ = BDF(0, 0x42, 0, 0), BDF(0, 0x42, 0, 1)


@pytest.fixture
def vf(host):
    host.add("nvme-sriov", PF_)
    host.add("nvme-vf", VF_, physfn=PF_)
    with SysfsDevice(VF_, root=host.root, writable=True) as dev:
        yield dev


def test_a_vf_reads_0xffff_but_has_the_kernels_identity(vf):
    assert vf.read(0x00, 4) == 0xFFFFFFFF
    assert vf.info.is_virtfn and vf.info.physfn == PF_
    assert (vf.info.vendor, vf.info.device) == (0x1B36, 0x0010)


def test_vf_header_is_captured_and_restored_with_the_kernels_identity(vf):
    saved = capture_header(vf)
    assert saved[0:4] == bytes.fromhex("361b1000")
    assert saved[4:] == b"".join(vf.read(o, 4).to_bytes(4, "little") for o in range(4, 64, 4))
    vf.write(0x04, 2, 0x0004)                           # the guest's driver: bus master
    vf.write(0x0C, 1, 0x10)
    written = restore_header(vf, saved)
    assert set(written) == {0x04, 0x0C}
    assert vf.read(0x04, 2) & 0x0004 == 0 and vf.read(0x0C, 1) == saved[0x0C]


def test_vf_release_through_the_device_set(vf, tmp_path):
    cfg = SimpleNamespace(policy_path=None, domid=7)
    devices = DeviceSet(cfg, dispatcher=None, platform=None, runtime=tmp_path / "run")
    write_atomic(devices._orig_path(VF_), capture_header(vf))
    vf.write(0x0C, 1, 0x20)
    devices._release(VF_, vf)
    assert vf.read(0x0C, 1) == 0
    assert not devices._orig_path(VF_).exists()


def test_a_vf_header_does_not_restore_onto_another_function(vf, host):
    saved = capture_header(vf)
    other = host.add("edu", BDF(0, 0x42, 5, 0))
    with pytest.raises(ValueError, match="not this function's"):
        restore_header(other, saved)


def test_a_vf_that_is_gone_is_not_captured(vf):
    class GoneVF:
        info = vf.info

        def read(self, offset, size):
            return (1 << (8 * size)) - 1
    with pytest.raises(ValueError, match="does not answer"):
        capture_header(GoneVF())
    with pytest.raises(ValueError):
        restore_header(GoneVF(), capture_header(vf))
