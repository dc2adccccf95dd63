"""What pcibackctl's commands (and the control server) see of the daemon.

Exactly what they use, nothing more: the supervisor satisfies it, and the
unit tests hand the server a fake.  Every method answers at once: none waits
for a worker (a command that needs workers sends them messages and returns
a :class:`~pcibackd.control.commands.Pending`).
"""

from __future__ import annotations

from typing import Protocol

from pcibackd.daemon.lifecycle import Lifecycle
from pcibackd.daemon.views import DaemonInfo, GuestInfo
from pcibackd.hostpci.release import ReleaseRecord
from pcibackd.wire.bdf import BDF


class DaemonFace(Protocol):
    lifecycle: Lifecycle     # the assignable pool and pci-attach/detach/list (answers at once too)

    @property
    def policy_path(self) -> str | None:
        """The config-space policy file (None: built-in defaults)."""

    def about(self) -> DaemonInfo:
        """The daemon itself: version, pid, uptime, platform, xenstore, control endpoints."""

    def guests(self) -> list[GuestInfo]:
        """Every guest by domid, with its worker's last report."""

    def observe_cpu(self, domid: int, pid: int, seconds: float) -> float | None:
        """The control endpoint read worker ``pid``'s CPU time from /proc: counted in its guest's
        totals; returns the guest's CPU seconds over all its workers (None: not known yet)."""

    def assignable(self) -> list[BDF]:
        """The host functions that can be given to guests, in the platform's order."""

    def releases(self) -> dict[BDF, tuple[ReleaseRecord, bool]]:
        """Each function's last release (reset method and result) and whether it is quarantined."""

    def clear_quarantine(self, bdf: BDF) -> bool:
        """Let a quarantined function be handed to a guest again; False: it was not quarantined."""

    def restart(self, domid: int) -> bool:
        """Replace the guest's worker (reviving a FATAL one); False: no such guest."""

    def send_worker(self, domid: int, cmd: str, args: dict | None = None, req_id: str | None = None) -> bool:
        """Queue a command for a worker, never blocking; False when it cannot be sent."""

    def set_log_level(self, level: str) -> None:
        """The daemon's own log level (workers are told by a fan-out)."""
