"""The devices one worker serves: host ports, their ConfSpaces, and claims.

A device is claimed with an ``flock`` on ``<lock_dir>/<bdf>.lock`` for as
long as the worker serves it: a second guest asking for the same function
fails (EBUSY → xenbus fatal), and a crashed worker's claim is released by the
kernel so its successor can take it again.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from loguru import logger

from ..pcihost.bdf import BDF
from .ops import Dispatcher


def lock_dir_for(cfg) -> Path:
    base = cfg.state_dir or (os.path.join(cfg.sim_dir, "run") if cfg.sim_dir else "/run/pcibackd")
    path = Path(base) / "claims"
    path.mkdir(parents=True, exist_ok=True)
    return path


class DeviceSet:
    """host BDF -> (guest BDF, ConfSpace); keeps the dispatcher's map current."""

    def __init__(self, cfg, dispatcher: Dispatcher):
        self.cfg, self.dispatcher = cfg, dispatcher
        self.lock_dir = lock_dir_for(cfg)
        self.entries: dict[BDF, tuple[BDF, object, int]] = {}   # host -> (guest, confspace, lock fd)

    def export(self, placement, opts: dict) -> None:
        """Claim, open and build every (host, guest) pair, all or nothing."""
        from ..confspace import ConfSpace
        from ..pcihost import open_host_device
        sim_root = Path(self.cfg.sim_dir) / "pci" if self.cfg.sim_dir else None
        added: list[BDF] = []
        try:
            for host, guest in placement:
                fd = self._claim(host)
                try:
                    port = open_host_device(host, sim_root, writable=self.cfg.platform == "xen")
                    conf = ConfSpace.build(port, None)
                except FileNotFoundError as exc:
                    os.close(fd)
                    raise OSError(errno.ENODEV, f"{host} is not an assignable device") from exc
                except Exception:
                    os.close(fd)
                    raise
                self.entries[host] = (guest, conf, fd)
                added.append(host)
                logger.info("exported {} as {}", host, guest)
        except OSError:
            self.remove(tuple(added))
            raise
        self._publish_map()

    def remove(self, hosts) -> None:
        for host in hosts:
            entry = self.entries.pop(host, None)
            if entry:
                os.close(entry[2])
                logger.info("removed {}", host)
        self._publish_map()

    def _claim(self, host: BDF) -> int:
        fd = os.open(self.lock_dir / f"{host}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EBUSY, f"{host} is already assigned to another guest") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.cfg.domid}\n".encode())
        return fd

    def _publish_map(self) -> None:
        # Replace wholesale: the op path never sees a half-updated map.
        self.dispatcher.devices = {(g.domain, g.bus, g.devfn): conf for g, conf, _ in self.entries.values()}

    def summary(self) -> list[dict]:
        return [{"bdf": str(h), "vbdf": str(g)} for h, (g, _, _) in sorted(self.entries.items())]

    def close(self) -> None:
        self.remove(tuple(self.entries))
