"""Simulated PCI functions built from real dumps, shared across processes like hardware.

A simulated function lives in files under a simulation root laid out like
sysfs, ``<root>/sys/bus/pci/devices/<bdf>/``:

* ``config``: the config bytes, mmapped by every process that opens the device;
* ``resource``, ``irq``, ``vendor``, ``device``, ``class``, ``subsystem_*``,
  ``revision``: as sysfs shows them (so ``SysfsDevice(bdf, root)`` reads it too);
* ``sim-model.json``: the compiled writable-bit model (:mod:`.hwmodel`) plus the
  power-on config a reset returns to (:meth:`SimDevice.function_reset`);
* ``sim-writes.log``: one JSON line per write that reached the device;
* ``reset_method`` (only when a test or an administrator set it): the methods
  the kernel tries, as sysfs shows them; absent, the device's own methods
  (:func:`.hwmodel.reset_methods`) in the kernel's order;
* ``sim-reset-fail`` (only to make a reset fail): ``error`` (the kernel gives
  up, the config is as before), ``dead`` (the function never comes back and
  reads all-ones) or ``silent`` (as ``dead``, but the kernel reports success);
* ``physfn`` (an SR-IOV VF only): a link to its physical function.

A write taking a function from D3hot to D0 resets it unless its PMCSR says
No_Soft_Reset (power-on values; the PME bits stay), as PCI PM 1.2 §3.2.4 says.

A function placed behind a simulated bridge lives inside the bridge's
directory and ``devices/<bdf>`` links to it, as in sysfs, so the bridges above
a function can be read from its real path.

Accesses are serialised with ``flock`` on the config file, the way a real
function sees one config cycle at a time, so a worker process can write while
a test process asserts and a restarted worker sees the same state.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import shutil
import struct
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciregs import CAP_PM, D0, D3HOT, PM_CTRL, PMCSR_PME_ENABLE, PMCSR_PME_STATUS, PMCSR_STATE
from simdom0.dumps import load_dump
from simdom0.hwmodel import Model, compile_model, kernel_restore, power_on_config, reset_methods
from simdom0.hwtables import PM_NO_SOFT_RESET
from pcibackd.hostpci.port import DeviceInfo
from pcibackd.hostpci.sysfs import check_access, devices_dir, list_host_devices, read_device_info

MODEL_FILE = "sim-model.json"
WRITE_LOG = "sim-writes.log"
RESET_METHOD = "reset_method"
RESET_FAIL = "sim-reset-fail"
RESET_FAILURES = ("error", "dead", "silent")
PMCSR_STICKY = PMCSR_PME_ENABLE | PMCSR_PME_STATUS    # kept across a reset (PME from D3cold)


def soft_reset_config(power_on: bytes, now: bytes, pmcsr: int) -> bytes:
    """The config after a D3hot -> D0 soft reset: power-on values, the PME bits kept."""
    out = bytearray(power_on)
    sticky = int.from_bytes(now[pmcsr:pmcsr + 2], "little") & PMCSR_STICKY
    value = int.from_bytes(out[pmcsr:pmcsr + 2], "little") & ~(PMCSR_STICKY | PMCSR_STATE) | sticky | D0
    out[pmcsr:pmcsr + 2] = value.to_bytes(2, "little")
    return bytes(out)


_UNPACK = {1: struct.Struct("<B").unpack_from, 2: struct.Struct("<H").unpack_from,
           4: struct.Struct("<I").unpack_from}


@dataclass(frozen=True)
class WriteRecord:
    """One config write that reached the simulated device."""

    offset: int
    size: int
    value: int       # what was written
    before: int      # the accessed bytes before the write
    after: int       # ... and after the model applied it
    register: str    # modelled register name ('' when the bytes are read-only)
    pid: int         # writer process

    @property
    def changed(self) -> int:
        """Bits that actually changed."""
        return self.before ^ self.after


def _id_files(dump) -> dict[str, str]:
    ids = dump.ids
    return {
        "vendor": f"0x{ids['vendor']:04x}\n",
        "device": f"0x{ids['device']:04x}\n",
        "class": f"0x{ids['class']:06x}\n",
        "subsystem_vendor": f"0x{ids['subsystem_vendor']:04x}\n",
        "subsystem_device": f"0x{ids['subsystem_device']:04x}\n",
        "revision": f"0x{ids['revision']:02x}\n",
        "irq": f"{dump.irq}\n",
    }


def open_files(root: Path, bdf: BDF, writable: bool = True) -> dict[str, int]:
    """The descriptors a :class:`SimDevice` works through (``config``, its write ``log``),
    opened by a privileged process for a worker that may not open them."""
    path = devices_dir(Path(root)) / str(bdf)
    mode = os.O_RDWR if writable else os.O_RDONLY
    config = os.open(path / "config", mode | os.O_CLOEXEC)
    try:
        log = os.open(path / WRITE_LOG, mode | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        os.close(config)
        raise
    return {"config": config, "log": log}


def _release(mm: mmap.mmap, fds: tuple[int, ...]) -> None:
    mm.close()
    for fd in fds:
        os.close(fd)


class SimDevice:
    """A HostPort whose config space follows the spec model and is shared through files."""

    def __init__(self, root: Path, bdf: BDF, files: dict[str, int] | None = None) -> None:
        """Attach to an existing simulated function (use :meth:`create` / :meth:`open`);
        ``files`` (from :func:`open_files`, taken over): through these descriptors."""
        self.root = Path(root)
        self.bdf = bdf
        self.path = devices_dir(self.root) / str(bdf)
        files = files if files is not None else open_files(self.root, bdf)
        self._fd, self._log_fd = files["config"], files["log"]
        meta = json.loads((self.path / MODEL_FILE).read_text())
        self.dump_name: str = meta["dump"]
        self.model = Model.from_dict(meta["model"])
        self._power_on = bytes.fromhex(meta["power_on_config"])
        writable = fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        self._mm = mmap.mmap(self._fd, self.model.config_size, mmap.MAP_SHARED,
                             access=mmap.ACCESS_DEFAULT if writable else mmap.ACCESS_READ)
        self._finalizer = weakref.finalize(self, _release, self._mm, (self._fd, self._log_fd))
        self._thread_lock = threading.Lock()    # flock does not exclude threads sharing our fd
        self.info: DeviceInfo = read_device_info(self.path, bdf, self.model.config_size)
        pm = next((c.offset for c in self.model.capabilities if c.kind == "legacy" and c.cap_id == CAP_PM), None)
        self._pmcsr = None if pm is None else pm + PM_CTRL

    # --- lifecycle ---------------------------------------------------------

    @classmethod
    def create(cls, root: Path, bdf: BDF, dump: str | Path, *, physfn: BDF | None = None,
               bridge: BDF | None = None) -> "SimDevice":
        """Materialise ``dump`` at ``bdf`` under ``root``; FileExistsError if it is taken.

        ``physfn`` makes it an SR-IOV VF of that function (a sysfs ``physfn``
        link; default: the PF the dump names, if any).  ``bridge`` places it
        behind that simulated bridge, as sysfs nests a function in its bridge's
        directory (``devices/<bdf>`` is then a link to it)."""
        d = load_dump(dump)
        physfn = physfn if physfn is not None else d.physfn
        model = compile_model(d.config, d.resources, virtfn=physfn is not None)
        config = power_on_config(d.config, model)
        listing = devices_dir(Path(root))
        listing.mkdir(parents=True, exist_ok=True)
        if (listing / str(bdf)).exists() or (listing / str(bdf)).is_symlink():
            raise FileExistsError(f"simulated device {bdf} already exists under {root}")
        parent = listing
        if bridge is not None:
            parent = Path(os.path.realpath(listing / str(bridge)))
            if not (parent / MODEL_FILE).is_file():
                raise FileNotFoundError(f"no simulated bridge {bridge} under {root}")
        final = parent / str(bdf)
        if final.exists():
            raise FileExistsError(f"simulated device {bdf} already exists under {root}")
        # Build in a scratch directory and rename, so another process never sees half a device.
        scratch = parent / f".creating-{bdf}-{os.getpid()}-{threading.get_ident()}"
        scratch.mkdir()
        try:
            (scratch / "config").write_bytes(config)
            shutil.copyfile(d.path / "resource", scratch / "resource")
            for name, text in _id_files(d).items():
                (scratch / name).write_text(text)
            meta = {"dump": d.name, "dump_bdf": str(d.bdf), "power_on_config": config.hex(),
                    "model": model.to_dict()}
            if physfn is not None:
                os.symlink(f"../{physfn}", scratch / "physfn")
            (scratch / MODEL_FILE).write_text(json.dumps(meta, indent=1))
            (scratch / WRITE_LOG).write_bytes(b"")
            try:
                os.rename(scratch, final)
            except OSError as e:          # ENOTEMPTY/EEXIST: lost a race with another creator
                raise FileExistsError(f"simulated device {bdf} already exists under {root}") from e
            if parent != listing:
                os.symlink(os.path.relpath(final, listing), listing / str(bdf))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return cls(Path(root), bdf)

    @classmethod
    def open(cls, root: Path, bdf: BDF) -> "SimDevice":
        """Attach to a device another process created."""
        return cls(Path(root), bdf)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "SimDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        # Sent to another process, a device is reopened there (it is the same hardware).
        return (SimDevice.open, (self.root, self.bdf))

    def __repr__(self) -> str:
        return f"SimDevice({self.bdf}, dump={self.dump_name!r}, root={str(self.root)!r})"

    # --- locking ---------------------------------------------------------

    @contextmanager
    def _locked(self, op: int) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._fd, op)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # --- HostPort --------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read naturally aligned ``size`` bytes (little-endian).

        Lock-free, like a hardware config read: an aligned load of <= 4
        bytes does not tear on x86, and writers hold the exclusive lock.
        """
        check_access(offset, size, self.model.config_size)
        return _UNPACK[size](self._mm, offset)[0]

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a config write through the model and log it (even if nothing changed)."""
        check_access(offset, size, self.model.config_size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit {size} bytes")
        with self._locked(fcntl.LOCK_EX):
            current = bytes(self._mm)
            new = self.model.apply(current, offset, size, value)
            self._mm[offset:offset + size] = new
            if self._soft_reset(current, offset, size):
                self._mm[:] = soft_reset_config(self._power_on, bytes(self._mm), self._pmcsr)
            record = WriteRecord(
                offset=offset, size=size, value=value,
                before=int.from_bytes(current[offset:offset + size], "little"),
                after=int.from_bytes(new, "little"),
                register=self.model.describe(offset), pid=os.getpid())
            os.write(self._log_fd, (json.dumps(asdict(record)) + "\n").encode())

    def _soft_reset(self, before: bytes, offset: int, size: int) -> bool:
        """Whether this write took the function from D3hot to D0 without No_Soft_Reset:
        that transition resets it (PCI PM 1.2 §3.2.4, No_Soft_Reset), the kernel's ``pm`` reset."""
        if self._pmcsr is None or not offset <= self._pmcsr < offset + size:
            return False
        old, new = before[self._pmcsr], self._mm[self._pmcsr]
        return (old & PMCSR_STATE == D3HOT and new & PMCSR_STATE == D0
                and not old & PM_NO_SOFT_RESET)

    # --- simulation-only -------------------------------------------------

    def write_log(self) -> list[WriteRecord]:
        """Every write since creation (or the last clear), oldest first, from all processes."""
        with self._locked(fcntl.LOCK_SH):
            text = (self.path / WRITE_LOG).read_text()
        return [WriteRecord(**json.loads(line)) for line in text.splitlines() if line]

    def clear_write_log(self) -> None:
        with self._locked(fcntl.LOCK_EX):
            os.ftruncate(self._log_fd, 0)

    def poke(self, offset: int, size: int, value: int) -> None:
        """Hardware-side store (e.g. the device latching an error bit): no model, not logged."""
        check_access(offset, size, self.model.config_size)
        data = value.to_bytes(size, "little")
        with self._locked(fcntl.LOCK_EX):
            self._mm[offset:offset + size] = data

    def alone_on_bus(self) -> bool:
        """Below a simulated bridge with no other function on its bus."""
        real = Path(os.path.realpath(self.path))
        if not (real.parent / MODEL_FILE).is_file():
            return False                  # on the root bus
        return not any(p.name != str(self.bdf) and (p / MODEL_FILE).is_file()
                       for p in real.parent.iterdir())

    def reset_methods(self) -> tuple[str, ...]:
        """The methods the kernel tries, in order (sysfs ``reset_method``)."""
        try:
            return tuple((self.path / RESET_METHOD).read_text().split())
        except FileNotFoundError:
            return reset_methods(self.config_bytes(), self.alone_on_bus())

    def set_reset_methods(self, methods: tuple[str, ...] | None) -> None:
        """What an administrator writes to ``reset_method`` (None: the default)."""
        if methods is None:
            (self.path / RESET_METHOD).unlink(missing_ok=True)
        else:
            (self.path / RESET_METHOD).write_text(" ".join(methods) + "\n")

    def fail_resets(self, how: str | None) -> None:
        """Make every reset fail ``how`` (see the module docstring); None: resets work again."""
        if how is None:
            (self.path / RESET_FAIL).unlink(missing_ok=True)
        elif how not in RESET_FAILURES:
            raise ValueError(f"reset failure {how!r} not in {RESET_FAILURES}")
        else:
            (self.path / RESET_FAIL).write_text(how)

    def function_reset(self) -> None:
        """What any reset does to the function: every register back to its power-on value."""
        with self._locked(fcntl.LOCK_EX):
            self._mm[:] = self._power_on

    def reset(self) -> None:
        """The kernel's reset (sysfs ``reset``, pci_reset_function): the function's config
        is saved, the function reset by its first method, and the saved config written back
        (:func:`.hwmodel.kernel_restore`); not logged, as the kernel's own accesses are not
        ours.  FileNotFoundError without a method (the kernel hides ``reset``), OSError
        ENOTTY when it fails."""
        if not self.reset_methods():
            raise FileNotFoundError(errno.ENOENT, "no reset method", str(self.path / "reset"))
        try:
            failure = (self.path / RESET_FAIL).read_text().strip()
        except FileNotFoundError:
            failure = ""
        with self._locked(fcntl.LOCK_EX):
            saved = bytes(self._mm)
            if failure in ("dead", "silent"):
                self._mm[:] = b"\xff" * len(self._mm)
            elif not failure:
                self._mm[:] = kernel_restore(self.model, saved, self._power_on)
        if failure in ("error", "dead"):
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def config_bytes(self) -> bytes:
        """Snapshot of the whole config space."""
        with self._locked(fcntl.LOCK_SH):
            return bytes(self._mm)


class SimHost:
    """A simulated PCI host: a root directory holding simulated functions."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def add(self, dump: str | Path, bdf: BDF | None = None, *, physfn: BDF | None = None,
            bridge: BDF | None = None) -> SimDevice:
        """Attach ``dump`` at ``bdf`` (default: the address it was captured at); see
        :meth:`SimDevice.create` for ``physfn`` and ``bridge``."""
        return SimDevice.create(self.root, bdf or load_dump(dump).bdf, dump, physfn=physfn,
                                bridge=bridge)

    def devices(self) -> list[BDF]:
        """Simulated functions present, sorted."""
        base = str(devices_dir(self.root))     # os.path, not pathlib: the device gate asks per claim
        return [b for b in list_host_devices(self.root) if os.path.isfile(f"{base}/{b}/{MODEL_FILE}")]

    def open(self, bdf: BDF) -> SimDevice:
        return SimDevice.open(self.root, bdf)
