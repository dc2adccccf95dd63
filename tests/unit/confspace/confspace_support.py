"""Helpers shared by the confspace tests (a simulated device plus its ConfSpace)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcibackd.confspace import ConfSpace, DevicePolicy
from simdom0.dumps import list_dumps
from simdom0.hostpci import SimDevice, SimHost, WriteRecord
from pcibackd.wire.pciif import Err

ALL_DUMPS = sorted(list_dumps())
FULL = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


@dataclass
class Rig:
    dev: SimDevice
    cs: ConfSpace

    def read(self, off: int, size: int) -> int:
        err, value = self.cs.read(off, size)
        assert err == Err.success, (off, size, err)
        return value

    def write(self, off: int, size: int, value: int, expect: int = Err.success) -> None:
        err = self.cs.write(off, size, value)
        assert err == expect, (off, size, hex(value), err)

    def hw(self, off: int, size: int) -> int:
        return self.dev.read(off, size)

    def log(self) -> list[WriteRecord]:
        return self.dev.write_log()

    def changed_log(self) -> list[WriteRecord]:
        """Writes that changed some device bit (or hit an RW1C bit with a 1)."""
        return [r for r in self.log() if r.changed]

    def rebuild(self, **kw) -> "Rig":
        return Rig(self.dev, ConfSpace.build(self.dev, **kw))


def make_rig(root: Path, dump: str, policy: DevicePolicy | None = None, *,
             clear_log: bool = True, snapshot: bytes | None = None) -> Rig:
    dev = SimHost(root).add(dump)
    cs = ConfSpace.build(dev, policy, snapshot)
    if clear_log:
        dev.clear_write_log()
    return Rig(dev, cs)


def accesses_covering(offset: int, size: int, limit: int):
    """Every (off, size) aligned access overlapping [offset, offset+size) inside ``limit``."""
    for asize in (1, 2, 4):
        start = offset - offset % asize
        for off in range(start, offset + size, asize):
            if off + asize <= limit:
                yield off, asize


def extract(value: int, value_off: int, off: int, size: int) -> int:
    """Bytes [off, off+size) of a little-endian ``value`` that starts at ``value_off``."""
    return (value >> (8 * (off - value_off))) & FULL[size]


def custom_dump(tmp: Path, base: str, patches: dict[int, bytes], name: str | None = None) -> Path:
    """A copy of shipped dump ``base`` with config bytes replaced at the given offsets."""
    import shutil

    from simdom0.dumps import list_dumps

    src = list_dumps()[base]
    dst = Path(tmp) / (name or f"{base}-custom")
    shutil.copytree(src, dst)
    config = bytearray((dst / "config.bin").read_bytes())
    for off, data in patches.items():
        config[off:off + len(data)] = data
    (dst / "config.bin").chmod(0o644)
    (dst / "config.bin").write_bytes(bytes(config))
    return dst


class MemPort:
    """A bare in-memory HostPort (no model, no log): for fuzzing layouts and counting reads."""

    def __init__(self, config: bytes, info) -> None:
        self.cfg = bytearray(config)
        self.info = info
        self.reads = 0
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return int.from_bytes(self.cfg[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))
        self.cfg[offset:offset + size] = value.to_bytes(size, "little")


def mem_port(dump: str, config: bytes | None = None) -> MemPort:
    from simdom0.dumps import load_dump
    from pcibackd.hostpci.port import DeviceInfo

    d = load_dump(dump)
    ids = d.ids
    info = DeviceInfo(d.bdf, ids["vendor"], ids["device"], ids["class"], ids["subsystem_vendor"],
                      ids["subsystem_device"], ids["revision"], d.irq, len(d.config), d.resources)
    return MemPort(config if config is not None else d.config, info)
