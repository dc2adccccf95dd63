"""Worker process states and the restart policy (supervisord's model).

The transitions between the states are one table, in ``guests.py``.

    NEW       the record exists, no worker yet (never outlives one scan)
    STARTING  spawned, not yet heard from
    RUNNING   heartbeats arriving
    BACKOFF   exited abnormally; restarts after a growing delay
    STOPPING  its backend went, or the daemon stops: finishing (SIGTERM if it takes too long)
    EXITED    finished on purpose (guest gone / teardown done)
    FATAL     failed too often in a row; not restarted until asked
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerState(enum.Enum):
    NEW = "NEW"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


@dataclass(frozen=True)
class RestartPolicy:
    """Restarts after the worker's own failures (see ``exit_event`` in guests.py):
    the first is immediate (a pending op must be re-served within Linux
    pcifront's 2 s); later ones back off exponentially, and ``max_failures`` in
    a row make the guest FATAL.  A worker that ran ``stable_after`` seconds has
    its failure count reset.

    Kills from outside (SIGKILL, the OOM killer) never make a guest FATAL: the
    restart is immediate when the killed worker was serving (RUNNING) or had run
    ``kill_stable_after``; kills of workers still booting, in a row, back off
    from ``kill_base_delay`` up to ``kill_max_delay`` (a kill loop costs at most
    one fork per that delay)."""

    max_failures: int = 5
    first_delay: float = 0.0
    base_delay: float = 0.1
    max_delay: float = 5.0
    stable_after: float = 10.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based)."""
        if failures <= 1:
            return self.first_delay
        return min(self.max_delay, self.base_delay * 2 ** (failures - 2))

    kill_base_delay: float = 0.05
    kill_max_delay: float = 1.0
    kill_stable_after: float = 1.0

    def kill_delay(self, kills: int) -> float:
        """Seconds to wait after outside kill number ``kills`` in a row (1-based)."""
        if kills <= 1:
            return 0.0
        return min(self.kill_max_delay, self.kill_base_delay * 2 ** (kills - 2))

    def gives_up(self, failures: int) -> bool:
        """True once ``failures`` in a row are too many: the guest becomes FATAL."""
        return failures >= self.max_failures
