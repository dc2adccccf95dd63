"""A guest's counters over all the workers that served it (pure: reports in, totals out).

A worker counts from its own start and reports its counts in every beat; when
it dies, its successor starts again from zero.  :class:`Tally` keeps each
counter as one series and adds up the workers: the totals never go down, so
``pcibackctl status`` and the metrics show what the guest was served, not what
its current worker was.  What a worker counted after its last beat is lost
with it: at most one heartbeat interval's worth.

Series come in two kinds:

=========  ==========================================================  ===========================
kind       a new worker's first value                                  series
=========  ==========================================================  ===========================
ZERO       counted by the new worker: added to the old worker's last   ops, errors, misses, service
                                                                       time buckets, CPU seconds
RESUMED    restored from the saved config-space state (possibly        denied writes per device
           stale): only what the new worker adds on top is added
=========  ==========================================================  ===========================

A value lower than the same worker's previous one (a device unplugged and
plugged back) is a reset: what was counted stays.

CPU seconds also take the supervisor's own readings of the live worker
(:meth:`Tally.observe_cpu`, from ``/proc``): a worker reports only when
something changed, so its last report's figure may be old.  CPU percent is not
kept here: the control endpoint measures it over fixed windows of those
readings (control/procstats.py).

:meth:`Tally.totals` is computed once per change (:attr:`Tally.version`), not
once per question.

Totals live in the supervisor's memory only: a new supervisor starts them
from the reports of the workers it adopts (what those counted since their own
start), so the workers that died before it are forgotten.  Kept that way on
purpose: Prometheus sees the reset from ``pcibackd_start_time_seconds`` and
its ``rate()`` and ``increase()`` absorb it, and a file written per report
would be write traffic on every change for a figure that is not exact anyway.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pcibackd.worker.link import WorkerReport
from pcibackd.worker.ops import SERVICE_BOUNDS_US

Key = tuple            # ("served", op), ("errors", op, code), ("denied_writes", bdf) ...


class Kind(enum.Enum):
    ZERO = "zero"
    RESUMED = "resumed"


KIND_OF = {"denied_writes": Kind.RESUMED}     # by a key's first element; ZERO otherwise


def series(r: WorkerReport) -> dict[Key, float]:
    """Every counter of a report, flat (the one place a new counter is added)."""
    out: dict[Key, float] = {("served", op): n for op, n in r.served.items()}
    for kind, by_op in (("errors", r.op_errors), ("misses", r.op_misses)):
        out.update({(kind, op, code): n for op, codes in by_op.items() for code, n in codes.items()})
    if r.service is not None and tuple(r.service.bounds_us) == SERVICE_BOUNDS_US:
        out.update({("service", i): n for i, n in enumerate(r.service.counts)})
        out[("service_sum_us",)] = r.service.sum_us
    out[("cpu_seconds",)] = r.cpu_seconds
    out[("spurious",)] = r.spurious
    out.update({("denied_writes", str(d.bdf)): d.denied_writes for d in r.devices})
    return out


@dataclass
class _Series:
    base: float = 0.0        # the total when the current count started
    first: float = 0.0       # the current count's value then
    last: float = 0.0

    @property
    def total(self) -> float:
        return self.base + self.last - self.first


@dataclass(frozen=True)
class Totals:
    """A guest's counters over all its workers (see the module docstring)."""

    served: dict[str, int] = field(default_factory=dict)                  # by op
    errors: dict[str, dict[str, int]] = field(default_factory=dict)       # op -> code -> n
    misses: dict[str, dict[str, int]] = field(default_factory=dict)       # op -> code -> n
    service_counts: tuple[int, ...] = ()        # per bucket of SERVICE_BOUNDS_US (+Inf last); () unknown
    service_sum_us: float = 0.0
    cpu_seconds: float = 0.0                    # reported, or read by the supervisor since (the larger)
    spurious: int = 0
    denied_writes: dict[str, int] = field(default_factory=dict)          # by host BDF
    workers: int = 0                            # workers whose reports are in these totals

    @staticmethod
    def summed(by_op: dict[str, dict[str, int]]) -> dict[str, int]:
        """op -> code -> n, as code -> n."""
        out: dict[str, int] = {}
        for codes in by_op.values():
            for code, n in codes.items():
                out[code] = out.get(code, 0) + n
        return out


class Tally:
    """One guest's series; feed it every authenticated report with :meth:`add`."""

    CPU: Key = ("cpu_seconds",)

    def __init__(self):
        self._series: dict[Key, _Series] = {}
        self._worker: tuple | None = None      # (pid, start) of the worker counting now
        self._fresh: set[Key] = set()          # series the current worker has not reported yet
        self._workers = 0
        self.version = 0                       # bumped by every change of the totals
        self._totals: tuple[int, Totals] | None = None

    def add(self, report: WorkerReport) -> None:
        """A report arrived."""
        worker = (report.pid, report.started)
        if worker != self._worker:
            self._next_worker(worker)
        for key, value in series(report).items():
            s = self._series.get(key)
            if s is None:
                self._series[key] = _Series(last=value)    # new to this guest: counted from zero
            elif key in self._fresh:
                self._fresh.discard(key)
                s.base, s.first, s.last = s.total, self._first(key, value), value
            elif key == self.CPU:           # never goes back within a worker: a lower report was
                s.last = max(s.last, value)   # made before the supervisor's last reading of /proc
            elif value < s.last:                           # a reset within one worker
                s.base, s.first, s.last = s.total, 0.0, value
            else:
                s.last = value
        self.version += 1

    def observe_cpu(self, pid: int, seconds: float) -> float | None:
        """The supervisor read ``seconds`` of CPU time of worker ``pid``: counted if that is
        the worker reporting now and it is more than its reports said.  Returns the guest's
        CPU seconds over all its workers (None before a report of its CPU)."""
        s = self._series.get(self.CPU)
        if s is None:
            return None
        if self._worker is not None and self._worker[0] == pid and self.CPU not in self._fresh and seconds > s.last:
            s.last = seconds
            self.version += 1
        return s.total

    def _next_worker(self, worker: tuple) -> None:
        self._worker = worker
        self._workers += 1
        self._fresh = set(self._series)

    @staticmethod
    def _first(key: Key, value: float) -> float:
        return value if KIND_OF.get(key[0], Kind.ZERO) is Kind.RESUMED else 0.0

    def totals(self) -> Totals:
        """The sums so far (the same object until the next change)."""
        if self._totals is None or self._totals[0] != self.version:
            self._totals = (self.version, self._sum())
        return self._totals[1]

    def _sum(self) -> Totals:
        by: dict[str, dict] = {"served": {}, "errors": {}, "misses": {}, "service": {}, "denied_writes": {}}
        single: dict[str, float] = {}
        for key, s in self._series.items():
            total = s.total
            if len(key) == 1:
                single[key[0]] = total
            elif len(key) == 2:
                by[key[0]][key[1]] = int(total)
            else:
                by[key[0]].setdefault(key[1], {})[key[2]] = int(total)
        service = by["service"]
        return Totals(served=by["served"], errors=by["errors"], misses=by["misses"],
                      service_counts=tuple(service.get(i, 0) for i in range(len(SERVICE_BOUNDS_US) + 1))
                      if service else (),
                      service_sum_us=single.get("service_sum_us", 0.0),
                      cpu_seconds=round(single.get("cpu_seconds", 0.0), 3),
                      spurious=int(single.get("spurious", 0)), denied_writes=by["denied_writes"],
                      workers=self._workers)
