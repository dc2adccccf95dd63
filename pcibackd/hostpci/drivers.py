"""Which dom0 driver holds a host function, and moving it to the stub driver and back.

:class:`HostDrivers` is the port the daemon's assignable pool uses: the real one
(:class:`SysfsDrivers`, plus the hypervisor's part in ``pcibackd.platform.hostdrivers``)
works on ``/sys/bus/pci``; the simulated dom0 answers with its own model.  The
in-use probe refuses what dom0 itself needs: a function with a mounted (or swap)
block device under it, or the network interface that carries the default route.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from pcibackd.hostpci.seize import STUB, SeizeError, current_driver, release, seize
from pcibackd.wire.bdf import BDF


class DriverError(OSError):
    """Binding, unbinding or assigning a function failed; the message names it."""


class HostDrivers(Protocol):
    """Driver binding and hypervisor assignment of host functions (the daemon's only)."""

    stub: str

    def functions(self) -> list[BDF]: ...
    def exists(self, bdf: BDF) -> bool: ...
    def driver(self, bdf: BDF) -> str | None: ...
    def in_use(self, bdf: BDF) -> str | None: ...           # why dom0 needs it; None: free
    def bind_stub(self, bdf: BDF) -> str | None: ...        # returns the driver it had; DriverError
    def unbind_stub(self, bdf: BDF, rebind: bool) -> None: ...
    def quarantine(self, bdf: BDF) -> str: ...
    def unquarantine(self, bdf: BDF) -> str: ...
    def give(self, domid: int, bdf: BDF) -> list[str]: ...  # grants + IOMMU assignment to a guest
    def take(self, domid: int, bdf: BDF) -> list[str]: ...  # their undoing (back to quarantine)


def default_route_interfaces(route_text: str) -> set[str]:
    """Interfaces of ``/proc/net/route`` lines whose destination is 0.0.0.0."""
    found = set()
    for line in route_text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2 and cols[1] == "00000000":
            found.add(cols[0])
    return found


def default_route6_interfaces(route_text: str) -> set[str]:
    """Interfaces of ``/proc/net/ipv6_route`` lines for ::/0 (not the loopback's unreachable one)."""
    found = set()
    for line in route_text.splitlines():
        cols = line.split()
        if len(cols) == 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
            found.add(cols[9])
    return found


def mounted_sources(mounts_text: str, swaps_text: str = "") -> set[str]:
    """Device names (``sda1``) mounted or used as swap."""
    names = set()
    for line in mounts_text.splitlines():
        src = line.split(" ", 1)[0]
        if src.startswith("/dev/"):
            names.add(os.path.basename(os.path.realpath(src)) if os.path.islink(src) else src[5:])
    for line in swaps_text.splitlines()[1:]:
        src = line.split()[0] if line.split() else ""
        if src.startswith("/dev/"):
            names.add(src[5:])
    return names


class SysfsDrivers:
    """The real kernel's driver model under ``root`` (``/`` on a dom0; a fake tree in tests).

    Stub binding goes through :func:`pcibackd.hostpci.seize.seize` (records under
    ``state_dir/seized``), so what it changed is undone exactly by ``release``.
    """

    stub = STUB

    def __init__(self, state_dir: Path, root: Path = Path("/")):
        self.state_dir, self.root = Path(state_dir), Path(root)

    def _dev(self, bdf: BDF) -> Path:
        return self.root / "sys/bus/pci/devices" / str(bdf)

    def functions(self) -> list[BDF]:
        found = []
        for entry in (self.root / "sys/bus/pci/devices").glob("*"):
            try:
                found.append(BDF.parse(entry.name))
            except ValueError:
                pass
        return sorted(found)

    def exists(self, bdf: BDF) -> bool:
        return (self._dev(bdf) / "config").exists()

    def driver(self, bdf: BDF) -> str | None:
        return current_driver(bdf, self.root)

    def in_use(self, bdf: BDF) -> str | None:
        dev = os.path.realpath(self._dev(bdf))
        default = default_route_interfaces(self._read("proc/net/route")) | \
            default_route6_interfaces(self._read("proc/net/ipv6_route"))
        for iface in sorted(default):
            for lower in [iface, *self._lower(iface)]:
                if os.path.realpath(self.root / "sys/class/net" / lower).startswith(dev + "/"):
                    via = "" if lower == iface else f" (through {iface})"
                    return f"its interface {lower} carries the default route{via}"
        mounted = mounted_sources(self._read("proc/self/mounts"), self._read("proc/swaps"))
        for blk in sorted((self.root / "sys/class/block").glob("*")):
            if not os.path.realpath(blk).startswith(dev + "/"):
                continue
            for name in [blk.name, *self._holders(blk)]:
                if name in mounted:
                    return f"its disk {blk.name} is in use (/dev/{name} is mounted or swap)"
        return None

    def _lower(self, iface: str, depth: int = 0) -> list[str]:
        """Interfaces under a bridge, bond or VLAN (``lower_*`` links, ``brif/``)."""
        net = self.root / "sys/class/net" / iface
        names = [p.name[6:] for p in net.glob("lower_*")] + [p.name for p in net.glob("brif/*")]
        if depth < 4:
            names += [n for name in list(names) for n in self._lower(name, depth + 1)]
        return names

    def _holders(self, blk: Path, depth: int = 0) -> list[str]:
        """Device-mapper, md and partitions stacked on ``blk``."""
        names = []
        for sub in [*blk.glob("holders/*"), *(p for p in blk.glob(blk.name + "*") if p.is_dir())]:
            names.append(sub.name)
            if depth < 4:
                names += self._holders(self.root / "sys/class/block" / sub.name, depth + 1)
        return names

    def _read(self, rel: str) -> str:
        try:
            return (self.root / rel).read_text()
        except OSError:
            return ""

    def bind_stub(self, bdf: BDF) -> str | None:
        if not self.exists(bdf):
            raise DriverError(2, f"no PCI function {bdf}")
        stale = self.state_dir / "seized" / str(bdf)
        if stale.exists() and self.driver(bdf) != self.stub:
            stale.unlink()          # from before a reboot: the function is dom0's again
        try:
            record = seize(bdf, self.state_dir, self.stub, self.root)
        except SeizeError as exc:
            self._undo(bdf)
            raise DriverError(exc.errno or 5, f"{bdf}: {exc}") from None
        now = self.driver(bdf)
        if now != self.stub:
            self._undo(bdf)
            raise DriverError(16, f"{bdf}: the stub driver {self.stub} did not bind it "
                                  f"(bound to {now or 'nothing'}; is {self.stub} loaded?)")
        return record.get("driver")

    def _undo(self, bdf: BDF) -> None:
        try:
            release(bdf, self.state_dir, self.root)
        except (OSError, ValueError):
            pass

    def unbind_stub(self, bdf: BDF, rebind: bool) -> None:
        try:
            if rebind:
                release(bdf, self.state_dir, self.root)
            else:
                # stays driverless and out of dom0's reach until someone probes it
                (self.state_dir / "seized" / str(bdf)).unlink(missing_ok=True)
        except SeizeError as exc:
            raise DriverError(exc.errno or 5, f"{bdf}: {exc}") from None

    def quarantine(self, bdf: BDF) -> str:
        return f"{bdf}: no hypervisor here, nothing to quarantine"

    def unquarantine(self, bdf: BDF) -> str:
        return f"{bdf}: no hypervisor here"

    def give(self, domid: int, bdf: BDF) -> list[str]:
        return []

    def take(self, domid: int, bdf: BDF) -> list[str]:
        return []
