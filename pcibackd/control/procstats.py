"""Worker process figures, read by the supervisor itself from ``/proc``: CPU, RSS, USS.

A worker reports only when something changed, so the CPU time in its last
report may be old; the supervisor reads it instead, in *sample passes*:

* a pass reads ``/proc/<pid>/stat`` of every live worker once (CPU time and
  RSS: one open, read and close each) and ``smaps_rollup`` (USS, a walk of
  every mapping) of at most :data:`USS_PER_PASS` of them, those measured
  longest ago first;
* passes are at least :data:`WINDOW` apart.  A status or metrics request that
  finds the last pass older than that runs one before it is answered (no
  worker is asked or waited for); while status requests keep coming (one in
  the last :data:`WATCHED` seconds) the control endpoint also runs one every
  :data:`WINDOW` from the supervisor's loop, so CPU percent is over a fixed
  window.  When nobody asks, nothing runs: an idle daemon does no periodic work;
* between passes a request measures only the workers started since the last
  one (their figures start at once), an O(new workers) top-up.

Each worker's CPU seconds go into its guest's tally (``observe_cpu``), which
adds up all the guest's workers and never goes down.  CPU percent is the
guest's CPU seconds between the last two passes over the time between them:
:data:`WINDOW` while watched, longer after a quiet time (``cpu_window`` says
how long); for a worker the previous pass did not see, over its life so far.
It is the same figure whoever asks, however often.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from pcibackd.daemon.views import GuestInfo

WINDOW = 10.0         # s: the shortest time between passes, the CPU percent window while watched
WATCHED = 300.0       # s after the last status request that passes keep running on their own
USS_PER_PASS = 4      # smaps walks per pass (0.5 ms each, far more on a loaded machine): a pass stays cheap
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# (domid, pid, CPU seconds read) -> the guest's CPU seconds over all its workers (None: not known)
ObserveCpu = Callable[[int, int, float], "float | None"]


@dataclass(frozen=True)
class Figures:
    """One guest's figures from the last pass (None: not known)."""

    pid: int | None = None                  # the worker measured
    rss: int | None = None                  # bytes, the live worker's
    uss: int | None = None                  # bytes, the live worker's (from an earlier pass, at times)
    cpu_percent: float | None = None        # of one CPU, over cpu_window
    cpu_window: float | None = None         # s


NONE = Figures()


def read_stat(pid: int, proc: str = "/proc") -> tuple[float, int, float] | None:
    """(CPU seconds user + system, RSS bytes, start in seconds after boot) of ``pid``; None if gone."""
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields count from state (3)
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) / TICK, int(fields[21]) * PAGE, int(fields[19]) / TICK
    except (IndexError, ValueError):
        return None


def read_uss(pid: int, proc: str = "/proc") -> int | None:
    """Memory only ``pid`` maps (private clean + dirty, bytes); None if unreadable."""
    try:
        with open(f"{proc}/{pid}/smaps_rollup", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in lines if line.startswith((b"Private_Clean:", b"Private_Dirty:"))]
    return sum(kib) * 1024 if kib else None


def since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class ProcSampler:
    """See the module docstring; ``now`` is time.monotonic() throughout."""

    def __init__(self, window: float = WINDOW, watched: float = WATCHED, proc: str = "/proc"):
        self.window, self.watched, self.proc = window, watched, proc
        self.passes = 0                        # passes so far (figures change only with a pass)
        self.last: float | None = None         # when the last pass ran
        self.watch_until = 0.0
        self._figures: dict[int, Figures] = {}
        self._prev: dict[int, tuple[float, float]] = {}     # domid -> (when, guest CPU s) at the last pass
        self._uss: dict[int, tuple[float, int | None]] = {}    # pid -> (when, USS)

    def figures(self, domid: int) -> Figures:
        return self._figures.get(domid, NONE)

    def stale(self, now: float) -> bool:
        """No pass within the window: a request runs one before it is answered."""
        return self.last is None or now - self.last >= self.window

    def watch(self, now: float) -> None:
        """A status request: keep passes running for :data:`WATCHED` seconds."""
        self.watch_until = now + self.watched

    def due(self, now: float) -> float | None:
        """When the loop should run the next pass (None: not watched, or no worker to watch)."""
        if self.last is None or now >= self.watch_until or not self._figures:
            return None
        return self.last + self.window

    def sample(self, guests: list[GuestInfo], observe_cpu: ObserveCpu, now: float) -> None:
        """One pass over ``guests``' live workers (see the module docstring)."""
        self._walk_uss([g.pid for g in guests if g.pid], now)
        boot_now = since_boot()
        figures: dict[int, Figures] = {}
        prev: dict[int, tuple[float, float]] = {}
        for g in guests:
            if g.pid and (measured := self._measure(g, observe_cpu, now, boot_now)) is not None:
                figures[g.domid], total = measured
                if total is not None:
                    prev[g.domid] = (now, total)
        self._figures, self._prev = figures, prev
        self.last = now
        self.passes += 1

    def top_up(self, guests: list[GuestInfo], observe_cpu: ObserveCpu, now: float) -> bool:
        """Measure the live workers the last pass did not see (started since), so a new worker
        has figures at once; the pass's own baseline and schedule stay as they are.  True: some."""
        new = [g for g in guests if g.pid and self._figures.get(g.domid, NONE).pid != g.pid]
        if not new:
            return False
        self._walk_uss([g.pid for g in new], now, prune=False)
        boot_now = since_boot()
        for g in new:
            measured = self._measure(g, observe_cpu, now, boot_now)
            if measured is not None:
                self._figures[g.domid] = measured[0]
        return True

    def _measure(self, g: GuestInfo, observe_cpu: ObserveCpu, now: float,
                 boot_now: float) -> tuple[Figures, float | None] | None:
        """(figures, the guest's CPU seconds over all its workers) of ``g``'s worker; None: gone."""
        stat = read_stat(g.pid, self.proc)
        if stat is None:
            return None
        cpu, rss, started = stat
        total = observe_cpu(g.domid, g.pid, cpu)
        percent = window = None
        before = self._prev.get(g.domid)
        if total is not None and before is not None and total >= before[1] and now > before[0]:
            window = now - before[0]
            percent = 100 * (total - before[1]) / window
        elif boot_now - started >= 1 / TICK:         # not seen by the last pass: over its life so far
            window = boot_now - started
            percent = 100 * cpu / window
        return Figures(g.pid, rss, self._uss.get(g.pid, (0.0, None))[1],
                       None if percent is None else round(percent, 1),
                       None if window is None else round(window, 2)), total

    def _walk_uss(self, pids: list[int], now: float, prune: bool = True) -> None:
        """USS of the :data:`USS_PER_PASS` of ``pids`` measured longest ago (never first);
        ``prune``: ``pids`` are every live worker, forget the others."""
        if prune:
            self._uss = {pid: self._uss[pid] for pid in pids if pid in self._uss}
        for pid in sorted(pids, key=lambda pid: self._uss.get(pid, (-1.0,))[0])[:USS_PER_PASS]:
            self._uss[pid] = (now, read_uss(pid, self.proc))
