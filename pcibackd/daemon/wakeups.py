"""What wakes the supervisor: one epoll set kept for the daemon's life, and a heap of deadlines.

Driver: the epoll object.

Nothing here is rebuilt per wake-up: an fd is registered once (a worker's
exit sentinel when it starts, unregistered when it is reaped) and a deadline
is pushed once (a restart after backoff, a stop timeout, a silence check);
a wake-up costs O(ready + due), not O(guests).  Heap entries are hints: the
caller re-checks the guest's state when one comes due (stale ones are dropped).

The loop measures its own lateness: time it was not running when it should
have (oversleeping a timeout, or an iteration that took long) is added to
:attr:`Wakeups.stalled`, and :meth:`Wakeups.clock` leaves it out, so a
supervisor starved of CPU never counts its own delay as a worker's silence.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time

SLACK = 0.05         # s of lateness a wake-up may have before it counts as a stall


class Wakeups:
    """See the module docstring."""

    def __init__(self):
        self.epoll = select.epoll()
        self.keys: dict[int, object] = {}
        self.heap: list[tuple[float, int, object, str]] = []
        self._seq = itertools.count()
        self.stalled = 0.0
        self._woke = time.monotonic()

    def watch(self, fd: int, key: object) -> None:
        """Report ``key`` when ``fd`` polls readable."""
        self.epoll.register(fd, select.EPOLLIN)
        self.keys[fd] = key

    def unwatch(self, fd: int | None) -> None:
        if fd is None or self.keys.pop(fd, None) is None:
            return
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def at(self, when: float, key: object, kind: str) -> None:
        """Come due at monotonic time ``when`` as ``(key, kind)``."""
        heapq.heappush(self.heap, (when, next(self._seq), key, kind))

    def due(self, now: float) -> list[tuple[object, str]]:
        """Pop every entry due by ``now``."""
        out = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, key, kind = heapq.heappop(heap)
            out.append((key, kind))
        return out

    def wait(self, cap: float, at_once: bool = False) -> list[object]:
        """Block until an fd is ready or the next deadline (at most ``cap`` s); the ready keys."""
        start = time.monotonic()
        busy = start - self._woke              # this iteration's own work
        if busy > SLACK * 4:
            self.stalled += busy
        timeout = 0.0 if at_once else cap
        if self.heap and not at_once:
            timeout = max(0.0, min(cap, self.heap[0][0] - start))
        ready = self.epoll.poll(timeout)
        self._woke = time.monotonic()
        late = self._woke - start - timeout
        if not ready and late > SLACK:
            self.stalled += late
        keys = self.keys
        return [keys[fd] for fd, _ in ready if fd in keys]

    def clock(self) -> float:
        """Monotonic time minus the loop's own stalls (judge workers' silence by this)."""
        return time.monotonic() - self.stalled

    def close(self) -> None:
        self.epoll.close()
