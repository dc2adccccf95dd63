"""Worker process states and the restart policy (supervisord's model).

    STARTING  spawned, not yet heard from
    RUNNING   heartbeats arriving
    BACKOFF   exited abnormally; restarts after a growing delay
    STOPPING  asked to stop (SIGTERM sent)
    EXITED    finished on purpose (guest gone / teardown done)
    FATAL     failed too often in a row; not restarted until asked
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerState(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


@dataclass(frozen=True)
class RestartPolicy:
    """The first restart is immediate (a pending op must be re-served within
    Linux pcifront's 2 s); later ones back off exponentially.  A worker that
    ran ``stable_after`` seconds has its failure count reset."""

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

    def next_state(self, failures: int) -> WorkerState:
        return WorkerState.FATAL if failures >= self.max_failures else WorkerState.BACKOFF
