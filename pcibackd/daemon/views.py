"""Read-only snapshots the supervisor hands out (to pcibackctl's commands).

Taking one never waits for a worker: a guest's snapshot carries the last
report its worker sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.tally import Totals
from pcibackd.irq.function import Kind
from pcibackd.irq.messages import IrqError, IrqStatus
from pcibackd.wire.bdf import BDF
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
class DeviceStatus:
    """A served function: its worker's report, and the PIRQs the supervisor's broker holds for it."""

    bdf: BDF
    vbdf: BDF
    permissive: bool
    denied_writes: int
    msi: int | None = None                       # the MSI PIRQ; None: MSI off
    msix: tuple[tuple[int, int], ...] = ()       # (entry, PIRQ); empty: MSI-X off
    msix_prepared: bool = False                  # PHYSDEVOP_prepare_msix done for it
    irq_error: IrqError | None = None            # the last interrupt error (symbolic names)

    @classmethod
    def of(cls, d: DeviceReport, s: IrqStatus | None, denied_writes: int | None = None) -> "DeviceStatus":
        """``denied_writes``: the guest's total over its workers (None: the report's)."""
        s = s or IrqStatus()
        m = s.mapping
        held = m is not None and m.held
        return cls(d.bdf, d.vbdf, d.permissive, d.denied_writes if denied_writes is None else denied_writes,
                   m.pirqs[0] if held and m.kind is Kind.msi else None,
                   tuple(zip(m.entries, m.pirqs)) if held and m.kind is Kind.msix else (),
                   s.msix_prepared, s.last_error)

    def to_dict(self) -> dict:
        return {"bdf": str(self.bdf), "vbdf": str(self.vbdf), "permissive": self.permissive,
                "denied_writes": self.denied_writes, "msi": self.msi,
                "msix": {str(entry): pirq for entry, pirq in self.msix},
                "msix_prepared": self.msix_prepared,
                "irq_error": self.irq_error.to_dict() if self.irq_error else None}


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
    interrupts: dict[BDF, IrqStatus] | None = None   # the broker's view by function (None: not known)
    name: str = ""                       # the domain's name ("" if not known)
    totals: Totals | None = None         # counters over all the guest's workers (None before a report)

    @property
    def devices(self) -> tuple[DeviceReport | DeviceStatus, ...]:
        devices = self.report.devices if self.report else ()
        if self.interrupts is None and self.totals is None:
            return devices
        interrupts, denied = self.interrupts or {}, self.totals.denied_writes if self.totals else {}
        return tuple(DeviceStatus.of(d, interrupts.get(d.bdf), denied.get(str(d.bdf))) for d in devices)
