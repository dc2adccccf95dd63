"""The worker's own watchdog on a pending op: the kernel's timer, not the supervisor's clock.

Driver: arms ``ITIMER_REAL`` and reads ``/proc/self/schedstat``.

While the op loop serves (a guest's op is pending), a one-shot timer runs.
When it fires the op has taken :data:`FIRST` seconds of wall time; from then
on it ticks every :data:`TICK` and counts only the time this process was not
waiting for a CPU (``run_delay`` in schedstat is the time spent runnable on a
run queue).  Once that own time reaches :data:`CONFIRM` the op is provably
stuck on this worker's account and :class:`StuckOp` is raised from the
handler: the worker exits with its own "stuck" status and the successor
serves the op that is still pending in the page.  A starved dom0 only makes
the watchdog wait longer; the supervisor's timing plays no part.

Arming costs two ``setitimer`` calls per wake-up of the op loop (not per op:
a busy-poll batch is one arming).  Waiting for the supervisor (an interrupt
broker question) is paused, not counted: see :meth:`OpWatchdog.paused`.
"""

from __future__ import annotations

import contextlib
import signal
import time

FIRST = 0.5          # s of wall time before the op is looked at
TICK = 0.1           # s between looks after that
CONFIRM = 0.4        # s of own (not starved) time after FIRST: stuck


class StuckOp(RuntimeError):
    """An op made no progress for FIRST + CONFIRM s of this process's own time."""


def run_delay_ns() -> int | None:
    """Nanoseconds this process has spent runnable but not running (None: not available)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


class OpWatchdog:
    """Arm with :meth:`arm` before serving, :meth:`disarm` after (see the module docstring)."""

    def __init__(self, first: float = FIRST, tick: float = TICK, confirm: float = CONFIRM):
        self.first, self.tick, self.confirm = first, tick, confirm
        self.armed = False
        self._since: tuple[float, int | None] | None = None
        self.installed = False

    @classmethod
    def after(cls, seconds: float) -> "OpWatchdog":
        """A watchdog that calls an op stuck after ``seconds`` in all (first look, then own time):
        an emulated dom0 whose host is loaded needs far more than the default FIRST + CONFIRM,
        since time its vCPU did not run at all is invisible to the scheduler's run delay."""
        first = min(FIRST, seconds * FIRST / (FIRST + CONFIRM))     # the default split below 0.9 s
        return cls(first=first, confirm=seconds - first)

    def install(self) -> None:
        """Take SIGALRM (main thread only); until then arm/disarm do nothing."""
        signal.signal(signal.SIGALRM, self._fire)
        self.installed = True

    def arm(self) -> None:
        if self.installed and not self.armed:
            self.armed, self._since = True, None
            signal.setitimer(signal.ITIMER_REAL, self.first)

    def disarm(self) -> None:
        if self.armed:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def paused(self):
        """A wait that is not this worker's doing (the supervisor answering) is not counted."""
        was = self.armed
        self.disarm()
        try:
            yield
        finally:
            if was:
                self.arm()

    def _fire(self, signum, frame) -> None:
        if not self.armed:
            return
        now, delay = time.monotonic(), run_delay_ns()
        if self._since is None:
            self._since = (now, delay)
        else:
            t0, d0 = self._since
            starved = (delay - d0) / 1e9 if delay is not None and d0 is not None else 0.0
            own = now - t0 - starved
            if own >= self.confirm:
                self.armed = False
                raise StuckOp(f"op pending for {self.first + own:.1f} s of this worker's own time "
                              f"({starved:.1f} s more waiting for a CPU)")
        signal.setitimer(signal.ITIMER_REAL, self.tick)
