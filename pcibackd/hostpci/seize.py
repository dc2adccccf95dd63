"""Keep a host function away from dom0's drivers while a guest has it.

``seize`` records the driver the function was bound to, unbinds it, turns
DMA off (see :func:`quiesce`), sets ``driver_override`` to a stub driver
(pci-stub by default) and re-probes, so no dom0 driver can claim it;
``release`` undoes that and lets the original driver probe again.  The record lives in ``<state_dir>/seized/<bdf>`` so a
restarted daemon can still release what an earlier one seized.

Only the toolstack side (``pcibackd.xenstore.toolstack attach --seize``) calls this, as root
on a real dom0.  Tests run it against a fake sysfs tree, never the host's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pcibackd.common.files import write_atomic
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciregs import (COMMAND, COMMAND_MASTER, COMMAND_MWI, HEADER_TYPE,
                                   HEADER_TYPE_MASK)

STUB = "pci-stub"


class SeizeError(OSError):
    pass


def _dev(root: Path, bdf: BDF) -> Path:
    return root / "sys/bus/pci/devices" / str(bdf)


def current_driver(bdf: BDF, root: Path = Path("/")) -> str | None:
    link = _dev(root, bdf) / "driver"
    return Path(link.resolve()).name if link.exists() else None


def _write(path: Path, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise SeizeError(exc.errno, f"writing {text.strip()!r} to {path}: {exc.strerror}") from None


def quiesce_command(command: int, header_type: int) -> int:
    """The COMMAND value a function nobody drives keeps, as xen-pciback leaves it.

    Linux's xen_pcibk_reset_device (at seize and after the restore at release)
    disables a type-0 function, which turns Bus Master off (DMA stops);
    decoding stays as it was.  A bridge only loses memory-write-invalidate.
    """
    if header_type & HEADER_TYPE_MASK == 0:
        return command & ~COMMAND_MASTER
    return command & ~COMMAND_MWI


def quiesce(bdf: BDF, root: Path = Path("/")) -> bool:
    """Apply :func:`quiesce_command` to the function's COMMAND register through
    sysfs ``config``; True if it had to be written."""
    path = _dev(root, bdf) / "config"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SeizeError(exc.errno, f"opening {path}: {exc.strerror}") from None
    try:
        header_type = os.pread(fd, 1, HEADER_TYPE)
        raw = os.pread(fd, 2, COMMAND)
        if len(header_type) != 1 or len(raw) != 2:
            raise SeizeError(5, f"short config read on {bdf}")
        command = int.from_bytes(raw, "little")
        want = quiesce_command(command, header_type[0])
        if want == command:
            return False
        if os.pwrite(fd, want.to_bytes(2, "little"), COMMAND) != 2:
            raise SeizeError(5, f"short config write on {bdf}")
        return True
    finally:
        os.close(fd)


def seize(bdf: BDF, state_dir: Path, stub: str = STUB, root: Path = Path("/")) -> dict:
    """Unbind from the dom0 driver and bind to ``stub``; returns the record."""
    dev = _dev(root, bdf)
    if not dev.exists():
        raise SeizeError(2, f"no PCI function {bdf}")
    record_path = Path(state_dir) / "seized" / str(bdf)
    if record_path.exists():
        return json.loads(record_path.read_text())          # already ours
    driver = current_driver(bdf, root)
    enable = dev / "enable"
    record = {"bdf": str(bdf), "driver": driver,
              "override": (dev / "driver_override").read_text().strip() if (dev / "driver_override").exists() else "",
              "enabled": enable.read_text().strip() if enable.exists() else ""}
    record_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(record_path, json.dumps(record).encode())
    if driver == stub:
        quiesce(bdf, root)
        return record
    _write(dev / "driver_override", stub + "\n")
    if driver is not None:
        _write(dev / "driver" / "unbind", str(bdf))
    # No DMA from a function nobody drives: a driver may leave Bus Master on when unbound.
    quiesce(bdf, root)
    # Like xen-pciback's pci_enable_device at seize: dom0 routes the legacy IRQ
    # (what /sys/.../irq then shows and the guest reads as its PIRQ).  sysfs
    # accepts "enable" only while no driver is bound (else EBUSY): now.
    if enable.exists() and record["enabled"] == "0":
        _write(enable, "1")
    _write(root / "sys/bus/pci/drivers_probe", str(bdf))
    return record


def is_seized(bdf: BDF, state_dir: Path) -> bool:
    """Whether :func:`seize` holds ``bdf`` (a record exists)."""
    return (Path(state_dir) / "seized" / str(bdf)).exists()


def release(bdf: BDF, state_dir: Path, root: Path = Path("/")) -> dict | None:
    """Undo :func:`seize` (unbind the stub, restore the override, re-probe)."""
    record_path = Path(state_dir) / "seized" / str(bdf)
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    dev = _dev(root, bdf)
    if current_driver(bdf, root) is not None and current_driver(bdf, root) != record["driver"]:
        _write(dev / "driver" / "unbind", str(bdf))
    if record.get("enabled") == "0" and (dev / "enable").exists():
        _write(dev / "enable", "0")             # driverless now, as sysfs requires
    _write(dev / "driver_override", (record["override"] or "") + "\n")
    if record["driver"]:
        _write(root / "sys/bus/pci/drivers_probe", str(bdf))
    record_path.unlink()
    return record
