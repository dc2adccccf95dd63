"""Physical-function access: real devices through sysfs, simulated ones from dumps."""

from __future__ import annotations

from pathlib import Path

from .bdf import BDF
from .dumps import Dump, list_dumps, load_dump
from .port import DeviceInfo, HostPort, Resource
from .sim import SimDevice, SimHost, WriteRecord
from .sysfs import SysfsDevice, list_host_devices


def open_host_device(bdf: BDF, sim_root: Path | None = None, writable: bool = False) -> HostPort:
    """A simulated device when ``sim_root`` is given, else the real one (read-only unless ``writable``)."""
    if sim_root is not None:
        return SimDevice.open(Path(sim_root), bdf)
    return SysfsDevice(bdf, writable=writable)


STUB_DRIVERS = ("pciback", "pci-stub", "vfio-pci")


def assignable_devices(sim_root: Path | None = None, root: Path = Path("/")) -> list[BDF]:
    """Functions a guest may be given: every simulated device, or on a real
    dom0 those bound to a stub driver (kept away from dom0's own drivers)."""
    if sim_root is not None:
        return SimHost(Path(sim_root)).devices() if Path(sim_root).exists() else []
    found = set()
    for drv in STUB_DRIVERS:
        d = root / "sys/bus/pci/drivers" / drv
        if d.is_dir():
            for entry in d.iterdir():
                try:
                    found.add(BDF.parse(entry.name))
                except ValueError:
                    pass
    return sorted(found)


__all__ = [
    "BDF", "DeviceInfo", "Dump", "HostPort", "Resource", "SimDevice", "SimHost", "SysfsDevice",
    "WriteRecord", "assignable_devices", "list_dumps", "list_host_devices", "load_dump", "open_host_device",
]
