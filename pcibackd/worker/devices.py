"""The devices one worker serves: host ports, their ConfSpaces, and claims.

Driver: opens devices through the platform, takes flocks, writes state files.

A device is claimed with an ``flock`` on ``<runtime>/claims/<bdf>.lock`` for
as long as the worker serves it (taken by the supervisor's device gate, which
also opens the device's files: :mod:`.devicegate`): a second guest asking for the same function
fails (EBUSY → xenbus fatal), and a crashed worker's claim is released by the
kernel so its successor can take it again.

A worker writes only in its own directory, ``<runtime>/state/dom<N>/`` (its
uid's: no other worker reads or plants anything there; the supervisor reads
it).  The emulated config-space state of each device is saved there
(``<bdf>.snap``, written atomically at every change) so a restarted worker
of the same guest continues where its predecessor stopped.

The function's state as it was before this guest had it is kept in
``<bdf>.orig`` from its first export until it has been reset and restored on
leaving (:mod:`pcibackd.hostpci.release`); the successor of a worker that
died mid-way restores it, not what the guest left (another guest's worker
cannot read it: a function left unreleased is captured afresh, as it is, by
its next guest's worker).  How that release went is kept
in ``<bdf>.release``; a function whose reset failed is quarantined
(``<bdf>.quarantine``) and no guest gets it until ``pcibackctl quarantine
clear --force`` (the supervisor's device gate checks every worker's records
before it lends a function; :meth:`DeviceSet.export` checks what it can see).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from pcibackd.common.files import write_atomic
from pcibackd.confspace import ConfSpace, PolicyStore
from pcibackd.hostpci.port import HostPort
from pcibackd.hostpci.release import SavedState, capture_state, release_function
from pcibackd.hostpci.records import quarantined, worker_state_dir, write_record
from pcibackd.platform.api import Platform
from pcibackd.wire.bdf import BDF
from pcibackd.worker.devicegate import GateOpener, LocalOpener
from pcibackd.worker.ops import Dispatcher
from pcibackd.worker.topology import PLAIN, HostFacts


@dataclass(slots=True)
class DeviceEntry:
    """One served host function."""

    guest: BDF              # where the guest sees it
    conf: ConfSpace         # its virtualized config space (over the host port)
    claim_fd: int           # holds the flock on its claim file


def _truthy(value: str | None) -> bool:
    return value in ("1", "yes", "true", "on")


class DeviceSet:
    """host BDF -> :class:`DeviceEntry`; keeps the dispatcher's map current.

    ``runtime`` is the runtime directory (claims and saved state live below it;
    this worker writes only in :attr:`state_dir`, its own).
    """

    def __init__(self, cfg, dispatcher: Dispatcher, platform: Platform, runtime: Path):
        self.cfg, self.dispatcher, self.platform = cfg, dispatcher, platform
        runtime = Path(runtime)
        self.lock_dir = runtime / "claims"
        self.shared_state = runtime / "state"
        self.state_dir = worker_state_dir(self.shared_state, cfg.domid)
        for d in (self.lock_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.policy = PolicyStore(cfg.policy_path)
        # Through the supervisor's gate when there is one: the worker opens no device file itself.
        gate = getattr(cfg, "device_gate", None)
        self.opener = GateOpener(platform, gate, getattr(cfg, "orphan_grace", 0.0)) if gate else LocalOpener(platform, self.lock_dir, cfg.domid)
        self.entries: dict[BDF, DeviceEntry] = {}

    def export(self, placement, opts: dict, resume: bool = False) -> None:
        """Claim, open and build every (host, guest) pair, all or nothing."""
        added: list[BDF] = []
        try:
            for host, guest in placement:
                if not resume and (why := quarantined(self.shared_state, host)) is not None:
                    raise OSError(errno.EBUSY, f"{host} is quarantined: its last reset failed "
                                               f"({why.describe()}); clear it with "
                                               f"'pcibackctl quarantine clear --force {host}'")
                try:
                    fd, port = self.opener.claim(host)
                except FileNotFoundError as exc:
                    raise OSError(errno.ENODEV, f"{host} is not an assignable device") from exc
                try:
                    if self.cfg.topology == "vpci" and port.read(0x0E, 1) & 0x7F == 1:
                        # Linux means to refuse this too, but its class test (class >> 24 on a
                        # 24-bit class) never matches, so it exports bridges.  We refuse: the
                        # virtual bus exposes nothing behind a bridge, so the guest would get
                        # a bridge it cannot use (its bus numbers and windows read-only here).
                        raise OSError(errno.EFAULT, "can't export bridges on the virtual PCI bus")
                    conf = self._build(host, port, dict(opts.get(host, ())), resume)
                except FileNotFoundError as exc:
                    os.close(fd)
                    raise OSError(errno.ENODEV, f"{host} is not an assignable device") from exc
                except (OSError, ValueError) as exc:
                    os.close(fd)
                    # strerror, not str(): no "[Errno N]" inside the message
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    raise OSError(getattr(exc, "errno", None) or errno.EINVAL, f"{host}: {reason}") from exc
                self.entries[host] = DeviceEntry(guest, conf, fd)
                added.append(host)
                logger.info("exported {} as {}{}", host, guest, " (resumed)" if resume else "")
        except OSError:
            # A failed resume keeps the saved state: the next attempt may succeed.
            self.remove(tuple(added), forget_state=not resume)
            raise
        self._publish_map()

    def host_facts(self, host: BDF) -> HostFacts:
        """What placement needs to know about ``host``: whether it is an SR-IOV VF and which
        bridges are above it (a function that cannot be opened counts as a plain one)."""
        try:
            port = self.opener.peek(host)
        except OSError:
            return PLAIN
        try:
            return HostFacts(port.info.is_virtfn, port.info.upstream)
        finally:
            close = getattr(port, "close", None)
            if close is not None:
                close()

    def _build(self, host: BDF, port, opts: dict, resume: bool) -> ConfSpace:
        snap_path = self._snap_path(host)
        snapshot = None
        if resume:
            try:
                snapshot = snap_path.read_bytes()
            except FileNotFoundError:
                logger.warning("{}: no saved config-space state; starting from the captured state", host)
        else:
            snap_path.unlink(missing_ok=True)     # a fresh guest never inherits old state
        orig = self._orig_path(host)
        if not orig.exists():
            try:
                write_atomic(orig, capture_state(port).to_bytes())
            except ValueError as exc:
                logger.warning("{}: not saving its header for release: {}", host, exc)
        conf = ConfSpace.build(port, self.policy.for_device(port.info), snapshot)
        if _truthy(opts.get("permissive")):
            conf.permissive = True                # libxl's permissive=1 (pciback/permissive)
        if conf.permissive:
            _warn_permissive(host, self.cfg.domid, "toolstack opts" if _truthy(opts.get("permissive"))
                             else "policy file")
        conf.on_change = lambda: self._save(host, conf)
        self._save(host, conf)
        return conf

    def _snap_path(self, host: BDF) -> Path:
        return self.state_dir / f"{host}.snap"

    def _orig_path(self, host: BDF) -> Path:
        return self.state_dir / f"{host}.orig"

    def _save(self, host: BDF, conf: ConfSpace) -> None:
        write_atomic(self._snap_path(host), conf.snapshot())

    def remove(self, hosts, forget_state: bool = True) -> None:
        """Stop serving ``hosts``; ``forget_state``: the device leaves its guest (reset, restore, drop state)."""
        for host in hosts:
            entry = self.entries.pop(host, None)
            if entry:
                if forget_state:
                    # The device leaves its guest: reset and restore it before the
                    # claim goes, so the next user never sees this guest's settings.
                    self._release(host, entry.conf.port)
                    self._snap_path(host).unlink(missing_ok=True)
                os.close(entry.claim_fd)
                self.policy.forget(host)
                logger.info("removed {}", host)
        self._publish_map()

    def _release(self, host: BDF, port) -> None:
        """Reset with the function's best method and restore its seize-time state; record how
        it went (a failed reset quarantines the function)."""
        orig = self._orig_path(host)
        saved, why = None, ""
        try:
            saved = SavedState.from_bytes(orig.read_bytes())
        except FileNotFoundError:
            why = f"no saved state ({orig} missing)"
        except (OSError, ValueError) as exc:
            why = f"saved state unreadable: {exc}"
        record = release_function(host, port, saved, why)
        if not record.keep_saved:
            orig.unlink(missing_ok=True)      # used, or stale: the next export captures afresh
        write_record(self.state_dir, record)
        if record.reset_ok and not record.restore_error:
            logger.info("released {}: {}", host, record.describe())
        elif record.reset_ok:
            logger.warning("released {}: {}", host, record.describe())
        else:
            logger.error("released {}: {}; quarantined: no guest gets it until cleared with --force",
                         host, record.describe())

    def _publish_map(self) -> None:
        # Replace wholesale: the op path never sees a half-updated map.
        self.dispatcher.devices = {(e.guest.domain, e.guest.bus, e.guest.devfn): e.conf
                                   for e in self.entries.values()}

    def find(self, domain: int, bus: int, devfn: int) -> tuple[BDF, HostPort] | None:
        """The host address and HostPort of the function the guest sees at (domain, bus, devfn)."""
        for host, entry in self.entries.items():
            g = entry.guest
            if (g.domain, g.bus, g.devfn) == (domain, bus, devfn):
                return host, entry.conf.port
        return None

    # --- commands ------------------------------------------------------------
    def set_permissive(self, bdf: str | None, on: bool) -> list[str]:
        """Per-device permissive override; ``bdf`` None = every device of this guest."""
        want = BDF.parse(bdf) if bdf else None
        hit = []
        for host, entry in self.entries.items():
            if want is None or host == want:
                if on and not entry.conf.permissive:
                    _warn_permissive(host, self.cfg.domid, "pcibackctl permissive")
                entry.conf.permissive = on
                self._save(host, entry.conf)
                hit.append(str(host))
        if want is not None and not hit:
            raise LookupError(f"{bdf} is not served by this worker")
        return hit

    def reload_policy(self, text: str | None = None) -> list[str]:
        """Re-read the policy file (or take its ``text``) and apply each device's new policy."""
        new = self.policy.reload(text)
        for host, entry in self.entries.items():
            if host in new:
                was = entry.conf.permissive
                entry.conf.set_policy(new[host])
                if entry.conf.permissive and not was:
                    _warn_permissive(host, self.cfg.domid, "policy reload")
        return [str(h) for h in new]

    def summary(self) -> list[dict]:
        """One line per served device, for the heartbeat."""
        return [{"bdf": str(h), "vbdf": str(e.guest), "permissive": e.conf.permissive,
                 "denied_writes": e.conf.denied_writes} for h, e in sorted(self.entries.items())]

    def close(self, forget_state: bool = False) -> None:
        """Stop serving every device (see :meth:`remove`)."""
        self.remove(tuple(self.entries), forget_state=forget_state)


def _warn_permissive(host: BDF, domid: int, why: str) -> None:
    # As loud as the kernel backend is about it: the guest now reaches registers no rule protects.
    logger.warning("{}: permissive mode enabled for domain {} ({}): the guest may write "
                   "config-space registers that no rule protects", host, domid, why)
