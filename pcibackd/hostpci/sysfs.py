"""Real host functions through ``/sys/bus/pci/devices/BDF`` (read-only unless told).

Config space is read with ``os.pread`` at the exact offset and width, the same
access the kernel's sysfs ``config`` attribute turns into one config cycle.
The file is opened ``O_RDONLY`` unless ``writable=True`` (production dom0): on
a development machine the host's disk and network controllers are PCI devices,
so a stray write could take the machine down.

The same layout is produced by :mod:`simdom0.hostpci`, so a
``SysfsDevice`` pointed at a simulation root reads a simulated device.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.port import DeviceInfo, Resource
from pcibackd.hostpci.reset import parse_reset_method, probe_methods, read_facts

SYSFS_DEVICES = Path("sys/bus/pci/devices")
ACCESS_SIZES = (1, 2, 4)
CONFIG_SIZES = (256, 4096)

# sysfs attribute -> DeviceInfo field; all are "0x..." text.
_ID_FILES = {
    "vendor": "vendor",
    "device": "device",
    "class": "class_code",
    "subsystem_vendor": "subsystem_vendor",
    "subsystem_device": "subsystem_device",
    "revision": "revision",
}


def devices_dir(root: Path) -> Path:
    """``<root>/sys/bus/pci/devices``."""
    return Path(root) / SYSFS_DEVICES


def check_access(offset: int, size: int, config_size: int) -> None:
    """Raise ValueError unless ``size`` is 1/2/4, naturally aligned and inside config space."""
    if size not in ACCESS_SIZES:
        raise ValueError(f"config access size {size} not in {ACCESS_SIZES}")
    if offset < 0 or offset % size or offset + size > config_size:
        raise ValueError(f"config access {offset:#x}/{size} unaligned or outside {config_size} bytes")


def parse_resource_text(text: str) -> tuple[Resource, ...]:
    """Parse sysfs ``resource``: one ``start end flags`` line (hex) per resource."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"bad resource line: {line[:80]!r}")
        out.append(Resource(*(int(f, 16) for f in fields)))
    return tuple(out)


def _bdf_or_none(name: str) -> BDF | None:
    try:
        return BDF.parse(name)
    except ValueError:
        return None


def physfn_of(devdir: Path) -> BDF | None:
    """The physical function of an SR-IOV VF (its ``physfn`` link), else None."""
    try:
        target = os.readlink(devdir / "physfn")
    except OSError:
        return None
    return _bdf_or_none(Path(target).name)


def upstream_of(devdir: Path) -> tuple[BDF, ...]:
    """The bridges above a function, the root's first: the PCI addresses on the way
    from its host bridge to the function in the device's real sysfs path
    (``/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0``)."""
    chain: list[BDF] = []
    for part in Path(os.path.realpath(devdir)).parents:
        bdf = _bdf_or_none(part.name)
        if bdf is None:
            break
        chain.append(bdf)
    return tuple(reversed(chain))


def alone_on_bus(devdir: Path) -> bool:
    """Whether the function sits below a bridge with no other function on that bus
    (in sysfs a bridge's directory holds its children's directories)."""
    real = Path(os.path.realpath(devdir))
    if _bdf_or_none(real.parent.name) is None:
        return False                      # on a root bus: no bridge above to reset it
    me = _bdf_or_none(real.name)
    try:
        names = os.listdir(real.parent)
    except OSError:
        return False
    return not any((b := _bdf_or_none(n)) is not None and b != me and me is not None and b.bus == me.bus
                   for n in names)


def read_device_info(devdir: Path, bdf: BDF, config_size: int) -> DeviceInfo:
    """Build DeviceInfo from the sysfs attribute files of one function."""
    ids = {field: int((devdir / name).read_text().strip(), 16) for name, field in _ID_FILES.items()}
    irq_path = devdir / "irq"
    irq = int(irq_path.read_text().strip()) if irq_path.exists() else 0
    res_path = devdir / "resource"
    resources = parse_resource_text(res_path.read_text()) if res_path.exists() else ()
    return DeviceInfo(bdf=bdf, irq=irq, config_size=config_size, resources=resources,
                      physfn=physfn_of(devdir), upstream=upstream_of(devdir), **ids)


def list_host_devices(root: Path = Path("/")) -> list[BDF]:
    """Every function under ``<root>/sys/bus/pci/devices``, sorted."""
    try:
        names = os.listdir(devices_dir(root))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            found.append(BDF.parse(name))
        except ValueError:
            continue
    return sorted(found)


def open_function_files(bdf: BDF, root: Path = Path("/"), writable: bool = False) -> dict[str, int]:
    """The descriptors a :class:`SysfsDevice` works through, opened by a privileged process
    for one that may not open them (``config``; ``reset`` when writable and present).

    sysfs decides how much of ``config`` a read returns from the *opener's* capabilities,
    so a descriptor opened here reads all of it in a process holding none."""
    path = devices_dir(Path(root)) / str(bdf)
    files = {"config": os.open(path / "config", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)}
    if writable:
        try:
            files["reset"] = os.open(path / "reset", os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass                  # no reset method: the kernel hides the attribute
        except OSError:
            os.close(files["config"])
            raise
    return files


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


class SysfsDevice:
    """HostPort over ``<root>/sys/bus/pci/devices/<bdf>/config``.

    ``files`` (from :func:`open_function_files`, taken over): work through these
    descriptors instead of opening the files (a worker without privileges)."""

    def __init__(self, bdf: BDF, root: Path = Path("/"), writable: bool = False,
                 files: dict[str, int] | None = None) -> None:
        self.bdf = bdf
        self.root = Path(root)
        self.writable = writable
        self.path = devices_dir(self.root) / str(bdf)
        if files is None:
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            files = {"config": os.open(self.path / "config", flags)}
        self._fd = files["config"]
        self._reset_fd = files.get("reset")
        self._finalizer = weakref.finalize(self, _close_all, tuple(files.values()))
        config_size = os.fstat(self._fd).st_size
        if config_size not in CONFIG_SIZES:
            self.close()
            raise OSError(f"{self.path}/config has unexpected size {config_size}")
        self.info = read_device_info(self.path, bdf, config_size)

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` (little-endian) in one pread."""
        check_access(offset, size, self.info.config_size)
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            # Without CAP_SYS_ADMIN the kernel returns only the first 64 bytes.
            raise OSError(f"short config read at {offset:#x} on {self.bdf} (need CAP_SYS_ADMIN?)")
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write through to the device; PermissionError unless opened writable."""
        if not self.writable:
            raise PermissionError(f"{self.bdf} was opened read-only")
        check_access(offset, size, self.info.config_size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit {size} bytes")
        if os.pwrite(self._fd, value.to_bytes(size, "little"), offset) != size:
            raise OSError(f"short config write at {offset:#x} on {self.bdf}")

    def reset_methods(self) -> tuple[str, ...]:
        """The reset methods the kernel tries, in order: sysfs ``reset_method`` (which an
        administrator may have changed), else the kernel's rules applied to config space."""
        try:
            return parse_reset_method((self.path / "reset_method").read_text())
        except FileNotFoundError:
            return probe_methods(read_facts(self.read, alone_on_bus(self.path)))

    def reset(self) -> None:
        """Function reset through sysfs ``reset`` (the kernel saves and restores
        the current config state around it).  FileNotFoundError when the
        function has no reset method: the kernel then hides the attribute."""
        if not self.writable:
            raise PermissionError(f"{self.bdf} was opened read-only: no reset")
        if self._reset_fd is not None:
            os.pwrite(self._reset_fd, b"1", 0)
            return
        # No O_CREAT: creating a missing sysfs attribute fails with EACCES,
        # which would hide the real reason (no reset method).
        fd = os.open(self.path / "reset", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "SysfsDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        # A worker process reopens the device instead of inheriting a descriptor.
        return (SysfsDevice, (self.bdf, self.root, self.writable))

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "ro"
        return f"SysfsDevice({self.bdf}, root={str(self.root)!r}, {mode})"
