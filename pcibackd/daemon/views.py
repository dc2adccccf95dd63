"""Read-only snapshots the supervisor hands out (to pcibackctl's commands).

Taking one never waits for a worker: a guest's snapshot carries the last
report its worker sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcibackd.daemon.states import WorkerState
from pcibackd.worker.link import DeviceReport, WorkerReport


@dataclass(frozen=True)
class DaemonInfo:
    version: str
    pid: int
    uptime: float                        # seconds
    platform: str                        # the platform's name ("xen", "sim")
    topology: str                        # "vpci" | "passthrough"
    xenstore: str                        # where the daemon reaches xenstored
    xenstore_connected: bool
    control: dict[str, str | None]       # the control endpoints by transport ("ipc", "tcp")


@dataclass(frozen=True)
class GuestInfo:
    domid: int
    state: WorkerState
    pid: int | None                      # None without a live worker
    adopted: bool                        # the worker was left running by a previous supervisor
    restarts: int
    last_exit: str                       # how the previous worker ended ("" if none did)
    heartbeat_age: float | None          # seconds since the last beat; None without a live worker
    report: WorkerReport | None          # the last heartbeat (None before the first)

    @property
    def devices(self) -> tuple[DeviceReport, ...]:
        return self.report.devices if self.report else ()
