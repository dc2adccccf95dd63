"""A function leaving its guest: reset with its best method, seize-time state restored,
a failed reset quarantines it.  The simulated devices model the methods from their
capabilities, the kernel's save/reset/restore and resets that fail."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from pcibackd.common.files import write_atomic
from pcibackd.hostpci.release import ReleaseRecord, SavedState, capture_state, release_function, restore_state
from pcibackd.hostpci.records import clear_quarantine, quarantined, read_records, write_record
from pcibackd.hostpci.reset import ResetFacts, ResetResult, probe_methods, reset_function
from pcibackd.hostpci.sysfs import SysfsDevice
from pcibackd.wire.bdf import BDF
from pcibackd.worker.devices import DeviceSet
from pcibackd.worker.ops import Dispatcher
from simdom0.dumps import DUMPS_DIR, list_dumps
from simdom0.hostpci import SimHost
from simdom0.platform import SimPlatform

DEV = BDF(0, 0x42, 3, 0)
BRIDGE = BDF(0, 0x00, 0x1C, 0)
BEHIND, SIBLING = BDF(0, 0x05, 0, 0), BDF(0, 0x05, 0, 1)


@pytest.fixture
def host(tmp_path) -> SimHost:
    return SimHost(tmp_path / "sim" / "pci")


def patched_dump(tmp_path: Path, name: str, patches: dict[int, bytes], as_name: str | None = None) -> Path:
    """A copy of a shipped dump with some config bytes changed (a capability the zoo lacks)."""
    out = tmp_path / "dumps" / (as_name or name)
    shutil.copytree(DUMPS_DIR / name, out)
    config = bytearray((out / "config.bin").read_bytes())
    for offset, data in patches.items():
        config[offset:offset + len(data)] = data
    (out / "config.bin").write_bytes(bytes(config))
    return out


def with_af(tmp_path: Path, af_cap: int) -> Path:
    """pci-testdev (no capabilities) given an Advanced Features capability at 0x40."""
    return patched_dump(tmp_path, "pci-testdev", {0x06: bytes([0x10]), 0x34: bytes([0x40]),
                                                  0x40: bytes([0x13, 0x00, 0x06, af_cap, 0, 0])},
                        as_name=f"af-{af_cap}")


def cap(dev, name: str) -> int:
    return next(c.offset for c in dev.model.capabilities if c.name == name)


# --- which method: from the capabilities, in the kernel's order; reset_method honoured -----

@pytest.mark.parametrize("dump,methods", [
    ("nvme", ("flr",)),                      # PM says No_Soft_Reset: no pm
    ("e1000e", ("pm",)),                     # no FLR in DEVCAP; D3hot->D0 resets it
    ("virtio-net-modern", ("flr", "pm")),
    ("edu", ()),                             # nothing at all (and on the root bus)
])
def test_methods_follow_the_capabilities(host, dump, methods):
    dev = host.add(dump, DEV)
    assert dev.reset_methods() == methods


@pytest.mark.parametrize("af_cap,methods", [(0x03, ("af_flr",)), (0x02, ()), (0x01, ())])
def test_af_flr_needs_both_transactions_pending_and_flr(host, tmp_path, af_cap, methods):
    dev = host.add(with_af(tmp_path, af_cap), DEV)
    assert dev.reset_methods() == methods


def test_bus_reset_only_for_a_function_alone_below_a_bridge(host):
    host.add("pci-bridge", BRIDGE)
    alone = host.add("edu", BEHIND, bridge=BRIDGE)
    assert alone.reset_methods() == ("bus",)
    host.add("pci-testdev", SIBLING, bridge=BRIDGE)
    assert alone.reset_methods() == ()                  # a bus reset would reset its sibling
    assert host.open(BRIDGE).reset_methods() == ()      # a bridge itself: never


def test_the_production_probe_agrees_with_the_simulated_hardware(host, tmp_path):
    """Without sysfs reset_method (older kernels) pcibackd applies the kernel's rules to config
    space; the simulated hardware states its methods from the specifications: they agree."""
    placed = [(host.add(name, BDF(0, 0x40, i, 0)), name) for i, name in enumerate(sorted(list_dumps()))
              if name != "nvme-vf"]
    placed.append((host.add(with_af(tmp_path, 3), BDF(0, 0x41, 0, 0)), "af"))
    host.add("pci-bridge", BRIDGE)
    placed.append((host.add("e1000e", BEHIND, bridge=BRIDGE), "e1000e behind a bridge"))
    for dev, name in placed:
        with SysfsDevice(dev.bdf, root=host.root) as real:
            assert real.reset_methods() == dev.reset_methods(), name


def test_sysfs_reset_method_is_read_as_the_kernel_shows_it(host):
    dev = host.add("virtio-net-modern", DEV)
    dev.set_reset_methods(("pm", "bus"))                # what an administrator wrote
    with SysfsDevice(DEV, root=host.root) as real:
        assert real.reset_methods() == ("pm", "bus")
    (dev.path / "reset_method").write_text("\n")
    with SysfsDevice(DEV, root=host.root) as real:
        assert real.reset_methods() == ()


def test_the_kernel_order_is_flr_af_pm_bus():
    every = ResetFacts(flr=True, af_flr=True, pm=True, alone_on_bus=True)
    assert probe_methods(every) == ("flr", "af_flr", "pm", "bus")
    assert probe_methods(ResetFacts()) == ()


def test_an_administrators_reset_method_is_what_runs(host):
    dev = host.add("virtio-net-modern", DEV)
    assert reset_function(dev).method == "flr"
    dev.set_reset_methods(("pm",))
    result = reset_function(dev)
    assert (result.method, result.ok) == ("pm", True)
    dev.set_reset_methods(())                           # resets disabled
    msix = cap(dev, "msix")
    dev.write(msix + 2, 2, 0xC000)                          # enabled and function-masked
    assert reset_function(dev) == ResetResult("none", True)
    assert dev.read(msix + 2, 2) & 0x8000                 # nothing was reset


@pytest.mark.parametrize("dump,method", [("nvme", "flr"), ("e1000e", "pm"), ("edu", "none")])
def test_each_method_resets_message_interrupts_to_power_on(host, dump, method):
    """What the kernel does not save for a driverless function comes back at power-on; a
    function without a method keeps what the guest left (the restore has to do it)."""
    dev = host.add(dump, DEV)
    name = "msix" if dump == "nvme" else "msi"
    bit = 0x8000 if name == "msix" else 0x0001
    dev.write(cap(dev, name) + 2, 2, dev.read(cap(dev, name) + 2, 2) | bit)
    result = reset_function(dev)
    assert (result.method, result.ok) == (method, True)
    assert bool(dev.read(cap(dev, name) + 2, 2) & bit) == (method == "none")


def test_af_flr_and_bus_reset_run_through_the_kernel_too(host, tmp_path):
    af = host.add(with_af(tmp_path, 3), DEV)
    assert reset_function(af) == ResetResult("af_flr", True)
    host.add("pci-bridge", BRIDGE)
    alone = host.add("edu", BEHIND, bridge=BRIDGE)
    result = reset_function(alone)
    assert (result.method, result.ok) == ("bus", True)


# --- failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("how,detail", [("error", "ENOTTY"), ("dead", "ENOTTY"),
                                        ("silent", "does not answer")])
def test_a_failed_reset_is_reported_never_raised(host, how, detail):
    dev = host.add("nvme", DEV)
    dev.fail_resets(how)
    result = reset_function(dev)
    assert (result.method, result.ok) == ("flr", False) and detail in result.detail
    assert "flr reset failed" in result.describe()


def test_sysfs_reset_errors_reach_the_result(host):
    host.add("nvme", DEV)
    with SysfsDevice(DEV, root=host.root, writable=True) as real:
        (real.path / "reset").mkdir()                   # writing it fails (EISDIR)
        result = reset_function(real)
    assert (result.method, result.ok) == ("flr", False)


# --- what is restored, class by class (resets disabled: the restore alone must do it) ------

def _restore_only(dev):
    dev.set_reset_methods(())
    return capture_state(dev)


def test_power_state_back_to_d0_first(host):
    """e1000e resets itself on D3hot -> D0: done last, that would undo the rest."""
    dev = host.add("e1000e", DEV)
    dev.write(0x0C, 1, 0x08)                              # dom0's cache line size at seize
    saved = _restore_only(dev)
    pm = cap(dev, "pm")
    dev.write(0x0C, 1, 0x10)
    dev.write(pm + 4, 2, dev.read(pm + 4, 2) | 0x3)       # the guest left it in D3hot
    dev.clear_write_log()
    done = restore_state(dev, saved)
    assert dev.read(pm + 4, 2) & 0x3 == 0 and done[0] == "pm"
    assert dev.write_log()[0].register.endswith("pmcsr")
    assert dev.read(0x0C, 1) == 0x08


def test_pcie_control_registers_as_seized(host):
    dev = host.add("virtio-net-modern", DEV)
    pcie = cap(dev, "pcie")
    saved = _restore_only(dev)
    assert [n for n, _, _ in saved.pcie] == ["devctl", "lnkctl", "devctl2", "lnkctl2"]
    before = {off: dev.read(pcie + off, 2) for off in (0x08, 0x10, 0x28, 0x30)}
    for off, flip in ((0x08, 0x0010), (0x10, 0x0003), (0x28, 0x0010), (0x30, 0x0001)):
        dev.write(pcie + off, 2, dev.read(pcie + off, 2) ^ flip)
    done = restore_state(dev, saved)
    assert {off: dev.read(pcie + off, 2) for off in before} == before
    assert {"pcie.devctl", "pcie.lnkctl", "pcie.devctl2", "pcie.lnkctl2"} <= set(done)


def test_a_link_less_function_has_no_link_control_saved(host):
    dev = host.add("e1000e", DEV)                        # a root-complex integrated endpoint, PCIe v1
    assert [n for n, _, _ in capture_state(dev).pcie] == ["devctl"]


def test_msi_and_msix_disabled_and_masked_intx_enabled(host, tmp_path):
    dev = host.add("e1000e", DEV)
    saved = _restore_only(dev)
    msi, msix = cap(dev, "msi"), cap(dev, "msix")
    dev.write(msi + 2, 2, dev.read(msi + 2, 2) | 0x0001)
    dev.write(msix + 2, 2, 0x8000)
    dev.write(0x04, 2, dev.read(0x04, 2) | 0x0400)         # INTx off while messages were on
    done = restore_state(dev, saved)
    assert dev.read(msi + 2, 2) & 0x0001 == 0
    assert dev.read(msix + 2, 2) & 0xC000 == 0              # disabled, function mask clear (Xen refuses a masked one)
    assert dev.read(0x04, 2) & 0x0400 == 0
    assert {"msi.control", "msix.control", "header.0x04"} <= set(done)


def test_per_vector_msi_masks_set(host, tmp_path):
    # edu's MSI made maskable with 8 vectors (the zoo has no type-0 function with masks)
    dev = host.add(patched_dump(tmp_path, "edu", {0x42: (0x0186).to_bytes(2, "little")}), DEV)
    saved = _restore_only(dev)
    dev.write(0x42, 2, 0x0001 | 0x0030)                    # enabled, 8 vectors
    dev.write(0x50, 4, 0)
    done = restore_state(dev, saved)
    assert dev.read(0x42, 2) & 0x0071 == 0 and dev.read(0x50, 4) == 0xFF
    assert {"msi.control", "msi.mask"} <= set(done)


def test_rom_address_back_decoding_off(host):
    dev = host.add("e1000e", DEV)
    dev.write(0x30, 4, dev.read(0x30, 4) | 1)              # dom0 had its ROM mapped at seize
    saved = _restore_only(dev)
    dev.write(0x30, 4, 0xFFFFF800)
    restore_state(dev, saved)
    assert dev.read(0x30, 4) == int.from_bytes(saved.header[0x30:0x34], "little") & ~1


def test_saved_state_round_trips_and_reads_an_older_bare_header(host):
    dev = host.add("virtio-net-modern", DEV)
    saved = capture_state(dev)
    assert SavedState.from_bytes(saved.to_bytes()) == saved
    assert SavedState.from_bytes(saved.header) == SavedState(saved.header)
    for junk in (b"{", b'{"format": 9}', b"x" * 65):
        with pytest.raises(ValueError):
            SavedState.from_bytes(junk)


# --- nothing written outside what the kernel's restore writes ------------------------------

# The registers Linux's pci_restore_state (with pci_msi/msix restore and the PM state it
# sets first) writes, by the simulated model's names; nothing else may change on release.
LINUX_RESTORE = {"command", "cache_line_size", "latency_timer", "interrupt_line", "rom",
                 *(f"bar{i}" for i in range(6)), "pmcsr", "devctl", "lnkctl", "devctl2", "lnkctl2",
                 "msi_control", "msi_mask", "msix_control"}


def _scribble_everything(dev) -> None:
    """A guest that changed every writable register it could reach."""
    for field in dev.model.fields:
        if field.rw and not field.name.startswith(("sriov", "vpd", "bist")):
            dev.write(field.offset, field.size, field.rw)


@pytest.mark.parametrize("dump", sorted(set(list_dumps()) - {"nvme-vf"}))
@pytest.mark.parametrize("reset", ["kernel", "none", "failed"])
def test_release_writes_only_what_linux_restores(host, dump, reset):
    dev = host.add(dump, DEV)
    saved = capture_state(dev)
    can_fail = reset == "failed" and bool(dev.reset_methods())
    {"none": lambda: dev.set_reset_methods(()), "failed": lambda: dev.fail_resets("error"),
     "kernel": lambda: None}[reset]()
    _scribble_everything(dev)
    dev.clear_write_log()
    record = release_function(DEV, dev, saved)
    names = {r.register.rsplit(".", 1)[-1] for r in dev.write_log()}
    assert names <= LINUX_RESTORE, names - LINUX_RESTORE
    assert "" not in {r.register for r in dev.write_log()}
    assert record.reset_ok == (not can_fail) and not record.restore_error
    if dev.read(0x0E, 1) & 0x7F == 0:
        assert not dev.read(0x04, 2) & 0x0404                # no DMA, INTx usable
        assert capture_state(dev).pcie == saved.pcie


# --- the worker's release: record, quarantine, the export that refuses it ------------------

def _devices(tmp_path, domid: int) -> DeviceSet:
    cfg = SimpleNamespace(policy_path=None, domid=domid, topology="vpci")
    return DeviceSet(cfg, Dispatcher(), SimPlatform(tmp_path / "sim", 0), tmp_path / "run")


def test_a_release_is_recorded_with_its_method(host, tmp_path):
    host.add("nvme", DEV)
    first = _devices(tmp_path, 7)
    first.export([(DEV, BDF(0, 0, 0, 0))], {})
    first.close(forget_state=True)
    record, quarantined_now = read_records(first.state_dir)[DEV]
    assert (record.method, record.reset_ok, quarantined_now) == ("flr", True, False)
    assert record.describe().startswith("flr reset ok; ")


def test_a_failed_reset_quarantines_until_cleared(host, tmp_path):
    dev = host.add("nvme", DEV)
    first = _devices(tmp_path, 7)
    first.export([(DEV, BDF(0, 0, 0, 0))], {})
    dev.fail_resets("error")
    first.close(forget_state=True)
    record, is_quarantined = read_records(first.state_dir)[DEV]
    assert (record.method, record.reset_ok, is_quarantined) == ("flr", False, True)
    assert quarantined(first.state_dir, DEV) == record
    assert record.restored                              # the state was still put back
    dev.fail_resets(None)
    second = _devices(tmp_path, 8)
    with pytest.raises(OSError, match="quarantined.*flr reset failed.*--force") as exc:
        second.export([(DEV, BDF(0, 0, 0, 0))], {})
    assert exc.value.errno == errno.EBUSY and not second.entries
    # the supervisor clears it, wherever a worker wrote it
    assert clear_quarantine(second.shared_state, DEV) and not clear_quarantine(second.shared_state, DEV)
    second.export([(DEV, BDF(0, 0, 0, 0))], {})         # handed out again
    assert DEV in second.entries
    second.close(forget_state=True)
    assert read_records(second.state_dir)[DEV][0].reset_ok


def test_a_worker_restart_resumes_even_a_quarantined_function(host, tmp_path):
    """The guest that has it keeps it: quarantine only stops the next guest."""
    host.add("nvme", DEV)
    devices = _devices(tmp_path, 7)
    write_atomic(devices.state_dir / f"{DEV}.quarantine", b"not json")
    assert quarantined(devices.state_dir, DEV).detail == "unreadable quarantine record"
    devices.export([(DEV, BDF(0, 0, 0, 0))], {}, resume=True)
    assert DEV in devices.entries


def test_records_survive_as_json_and_bad_ones_are_skipped(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    rec = ReleaseRecord(str(DEV), "pm", True, restored=("pm",), when=5.0)
    write_record(state, rec)
    (state / "junk.release").write_text("{")
    (state / f"{BDF(0, 1, 0, 0)}.release").write_text("[]")
    assert read_records(state) == {DEV: (rec, False)}


# --- the real sysfs code path, on a fake sysfs tree ----------------------------------------

def fake_sysfs(root: Path, bdf: BDF, config: bytes, parent: str = "pci0000:00/0000:00:1c.0") -> Path:
    """``/sys/devices/<parent>/<bdf>`` with the attributes SysfsDevice reads, and its bus link."""
    dev = root / "sys/devices" / parent / str(bdf)
    dev.mkdir(parents=True)
    (dev / "config").write_bytes(config)
    for name in ("vendor", "device", "class", "subsystem_vendor", "subsystem_device", "revision"):
        (dev / name).write_text("0x0\n")
    link = root / "sys/bus/pci/devices" / str(bdf)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(dev)
    return dev


def test_sysfs_probe_sees_siblings_and_root_buses(tmp_path):
    nvme = (DUMPS_DIR / "nvme" / "config.bin").read_bytes()
    e1000e = (DUMPS_DIR / "e1000e" / "config.bin").read_bytes()
    fake_sysfs(tmp_path, BDF(0, 5, 0, 0), e1000e)
    fake_sysfs(tmp_path, BDF(0, 0, 3, 0), e1000e, parent="pci0000:00")
    with SysfsDevice(BDF(0, 5, 0, 0), root=tmp_path) as alone, \
            SysfsDevice(BDF(0, 0, 3, 0), root=tmp_path) as on_root:
        assert alone.reset_methods() == ("pm", "bus") and on_root.reset_methods() == ("pm",)
    fake_sysfs(tmp_path, BDF(0, 5, 0, 1), nvme)
    with SysfsDevice(BDF(0, 5, 0, 0), root=tmp_path) as shared:
        assert shared.reset_methods() == ("pm",)


def test_sysfs_reset_writes_the_kernels_attribute_for_the_listed_method(tmp_path):
    dev = fake_sysfs(tmp_path, BDF(0, 5, 0, 0), (DUMPS_DIR / "nvme" / "config.bin").read_bytes())
    (dev / "reset_method").write_text("bus\n")           # an administrator's choice
    (dev / "reset").write_text("")
    with SysfsDevice(BDF(0, 5, 0, 0), root=tmp_path, writable=True) as real:
        assert reset_function(real) == ResetResult("bus", True)
    assert (dev / "reset").read_text() == "1"
    (dev / "reset").unlink()                             # the kernel found no method after all
    with SysfsDevice(BDF(0, 5, 0, 0), root=tmp_path, writable=True) as real:
        assert reset_function(real).method == "none"
    with SysfsDevice(BDF(0, 5, 0, 0), root=tmp_path) as read_only:
        result = reset_function(read_only)               # never on a read-only opening
    assert not result.ok and result.method == "bus"
