"""Real PCI config dumps shipped as package data (the source for simulated devices).

Each ``<name>/`` holds what was captured from one function:
``config.bin`` (sysfs ``config``, 256 or 4096 bytes), ``resource`` (sysfs
``resource``: BAR0..5, ROM, then SR-IOV and bridge-window lines), ``irq``,
``ids`` (``vendor=0x.. device=0x.. class=0x.. ...``) and ``lspci-vvv.txt``
(whose first token is the function's address at capture time); an SR-IOV
virtual function's dump also has ``physfn``, its physical function's address
at capture time (its ``ids`` are the kernel's identity: a VF's vendor and
device registers read 0xffff).

Origin: ``host-vm-*`` from the development VM's own bus; the others from a QEMU
q35 "zoo" (``nvme-sriov`` is the NVMe function with SR-IOV behind a root port,
``virtio-net-modern`` the virtio 1.0 PCIe NIC, ``virtio-net`` the transitional one).

``zoo/`` is a wider sweep set in the same format (``list_zoo``): ninety-odd
functions of every PCI device model QEMU 7.2 emulates without a host backend
(NICs, SCSI/RAID/IDE/AHCI/SD, USB, audio, VGA, serial/CAN/IPMI cards, virtio
legacy/transitional/modern, PCI and PCIe bridges and switch ports, an NVMe
with SR-IOV behind a switch and its two VFs, and the machines' own chipset
functions), captured by ``zoo/collect.py``: it boots plain QEMU (TCG) with a
Debian kernel and a busybox initramfs that enables SR-IOV VFs and prints each
function's sysfs files on the serial console, and rewrites ``zoo/<name>/``
from them (``lspci-vvv.txt`` there is decoded from the dump, not live).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcibackd.wire.bdf import BDF
from pcibackd.hostpci.port import Resource
from pcibackd.hostpci.sysfs import parse_resource_text

DUMPS_DIR = Path(__file__).resolve().parent
DUMP_FILES = ("config.bin", "resource", "irq", "ids", "lspci-vvv.txt")
ID_KEYS = ("vendor", "device", "class", "subsystem_vendor", "subsystem_device", "revision")


@dataclass(frozen=True)
class Dump:
    """One captured function."""

    name: str
    path: Path
    bdf: BDF                       # address at capture time
    config: bytes
    resources: tuple[Resource, ...]
    irq: int
    ids: dict[str, int]            # keys: ID_KEYS
    physfn: BDF | None = None      # an SR-IOV VF's PF at capture time


ZOO_DIR = DUMPS_DIR / "zoo"


def list_zoo() -> dict[str, Path]:
    """Name -> directory of every dump of the wider QEMU zoo (``zoo/``)."""
    return {p.name: p for p in sorted(ZOO_DIR.iterdir())
            if p.is_dir() and (p / "config.bin").is_file()}


def list_dumps() -> dict[str, Path]:
    """Name -> directory of every shipped dump."""
    return {p.name: p for p in sorted(DUMPS_DIR.iterdir())
            if p.is_dir() and (p / "config.bin").is_file()}


def _parse_ids(text: str) -> dict[str, int]:
    ids = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep and key in ID_KEYS:
            ids[key] = int(value, 16)
    missing = set(ID_KEYS) - ids.keys()
    if missing:
        raise ValueError(f"ids file lacks {sorted(missing)}")
    return ids


def load_dump(dump: str | Path) -> Dump:
    """Load a shipped dump by name, or any directory with the same files."""
    path = Path(dump) if isinstance(dump, Path) or "/" in str(dump) else DUMPS_DIR / dump
    if not (path / "config.bin").is_file():
        raise FileNotFoundError(f"no PCI dump at {path} (known: {', '.join(list_dumps())})")
    config = (path / "config.bin").read_bytes()
    if len(config) not in (256, 4096):
        raise ValueError(f"{path}/config.bin is {len(config)} bytes, not 256 or 4096")
    first_line = (path / "lspci-vvv.txt").read_text().split(maxsplit=1)
    return Dump(
        name=path.name,
        path=path,
        bdf=BDF.parse(first_line[0]),
        config=config,
        resources=parse_resource_text((path / "resource").read_text()),
        irq=int((path / "irq").read_text().strip() or 0),
        ids=_parse_ids((path / "ids").read_text()),
        physfn=BDF.parse((path / "physfn").read_text().strip()) if (path / "physfn").is_file()
        else None,
    )
