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


__all__ = [
    "BDF", "DeviceInfo", "Dump", "HostPort", "Resource", "SimDevice", "SimHost", "SysfsDevice",
    "WriteRecord", "list_dumps", "list_host_devices", "load_dump", "open_host_device",
]
