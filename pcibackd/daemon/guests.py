"""The supervisor's record of one guest, and the one table its worker state follows.

Every change of :attr:`Guest.state` goes through :meth:`Guest.change_state`:
the next state is ``TRANSITIONS[state, event]``, and a pair the table lacks
raises :class:`IllegalTransition` (supervisord's assert-then-change, h11's
table).  A beat that was on its way when its worker exited changes nothing.

The table (state, event -> next state):

"""

from __future__ import annotations

import enum
import os
import signal
from dataclasses import dataclass, field

from loguru import logger

from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.views import GuestInfo
from pcibackd.worker.link import WorkerReply, WorkerReport
from pcibackd.worker.main import EXIT_DONE, EXIT_ORPHANED, EXIT_STOPPED


class GuestEvent(enum.Enum):
    SPAWNED = "spawned"                  # a worker process was started
    SPAWN_FAILED = "spawn failed"        # starting one failed (e.g. the fork server died)
    ADOPTED = "adopted"                  # a previous supervisor's live worker was taken over
    BEAT = "beat"                        # an authenticated heartbeat arrived
    STOP_REQUESTED = "stop requested"    # the backend went, the daemon stops, or SIGTERM is due
    FINISHED = "finished"                # the worker exited on purpose, or after a stop request
    LEFT = "left"                        # stopped from outside or orphaned: the guest still needs service
    CRASHED = "crashed"                  # any other exit: restart after the policy's delay
    GAVE_UP = "gave up"                  # failed max_failures times in a row
    REVIVED = "revived"                  # pcibackctl restart of a guest without a worker


S, E = WorkerState, GuestEvent
TRANSITIONS: dict[tuple[WorkerState, GuestEvent], WorkerState] = {
    (S.NEW, E.SPAWNED): S.STARTING,
    (S.NEW, E.ADOPTED): S.STARTING,
    (S.NEW, E.SPAWN_FAILED): S.BACKOFF,
    (S.NEW, E.GAVE_UP): S.FATAL,
    (S.STARTING, E.BEAT): S.RUNNING,
    (S.STARTING, E.STOP_REQUESTED): S.STOPPING,
    (S.STARTING, E.FINISHED): S.EXITED,
    (S.STARTING, E.LEFT): S.BACKOFF,
    (S.STARTING, E.CRASHED): S.BACKOFF,
    (S.STARTING, E.GAVE_UP): S.FATAL,
    (S.RUNNING, E.BEAT): S.RUNNING,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPING,
    (S.RUNNING, E.FINISHED): S.EXITED,
    (S.RUNNING, E.LEFT): S.BACKOFF,
    (S.RUNNING, E.CRASHED): S.BACKOFF,
    (S.RUNNING, E.GAVE_UP): S.FATAL,
    (S.STOPPING, E.BEAT): S.STOPPING,
    (S.STOPPING, E.STOP_REQUESTED): S.STOPPING,
    (S.STOPPING, E.FINISHED): S.EXITED,
    (S.BACKOFF, E.SPAWNED): S.STARTING,
    (S.BACKOFF, E.SPAWN_FAILED): S.BACKOFF,
    (S.BACKOFF, E.GAVE_UP): S.FATAL,
    (S.BACKOFF, E.REVIVED): S.BACKOFF,
    (S.BACKOFF, E.BEAT): S.BACKOFF,
    (S.EXITED, E.REVIVED): S.BACKOFF,
    (S.EXITED, E.BEAT): S.EXITED,
    (S.FATAL, E.REVIVED): S.BACKOFF,
    (S.FATAL, E.BEAT): S.FATAL,
}
del S, E


def render_table() -> str:
    """:data:`TRANSITIONS` as aligned text, one transition a line."""
    return "\n".join(f"    {state.value:<9} {event.value:<15} -> {new.value}"
                     for (state, event), new in TRANSITIONS.items())


if __doc__ is not None:              # None under python -OO
    __doc__ += render_table() + "\n"


class IllegalTransition(RuntimeError):
    """An event the current state does not accept: a bug in the supervisor."""

    def __init__(self, domid: int, state: WorkerState, event: GuestEvent):
        super().__init__(f"domain {domid}: no transition from {state.value} on {event.value!r}")
        self.domid, self.state, self.event = domid, state, event


def exit_event(code: int | None, stopping: bool) -> GuestEvent:
    """What a worker's exit status means (``None``: unknown, an adopted worker).
    GAVE_UP is the restart policy's call, made on CRASHED."""
    if code in (EXIT_STOPPED, EXIT_ORPHANED) and not stopping:
        return GuestEvent.LEFT
    if stopping or code == EXIT_DONE:
        return GuestEvent.FINISHED
    return GuestEvent.CRASHED


def describe_exit(code: int | None) -> str:
    """An exit status for people: "exit 1", "signal SIGKILL"."""
    if code is None:
        return "exited (adopted; status unknown)"
    if code >= 0:
        return f"exit {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@dataclass
class Guest:
    """The supervisor's record of one frontend and its worker."""

    domid: int
    backend_path: str
    proc: object = None              # our child (from the spawner), or None
    pid: int | None = None
    sentinel: int | None = None      # readable when the worker exits (proc.sentinel or a pidfd)
    pidfd: int | None = None         # signals go through this, never a bare (reusable) pid
    adopted: bool = False            # left running by a previous supervisor
    token: str = ""                  # the worker proves its messages with this
    route: bytes | None = None       # its link's routing id, learned from its first message its pid sent
    stop_deadline: float = 0.0
    terminated: bool = False         # SIGTERM already sent while STOPPING
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0
    last_beat: float = 0.0
    report: WorkerReport | None = None   # the last heartbeat
    last_exit: str = ""
    _state: WorkerState = field(default=WorkerState.NEW, init=False, repr=False)

    @property
    def state(self) -> WorkerState:
        """Changed only by :meth:`change_state`."""
        return self._state

    def change_state(self, event: GuestEvent) -> WorkerState:
        """Move to ``TRANSITIONS[state, event]``; IllegalTransition if there is none."""
        new = TRANSITIONS.get((self._state, event))
        if new is None:
            raise IllegalTransition(self.domid, self._state, event)
        if new is not self._state:
            logger.debug("domain {}: {} -> {} ({})", self.domid, self._state.value, new.value, event.value)
        self._state = new
        return new

    def attach(self, pid: int, sentinel: int, pidfd: int | None, adopted: bool, now: float) -> None:
        """A worker now serves this guest: one we spawned, or one we adopted."""
        self.pid, self.sentinel, self.pidfd, self.adopted = pid, sentinel, pidfd, adopted
        self.route = None
        self.change_state(GuestEvent.ADOPTED if adopted else GuestEvent.SPAWNED)
        self.started_at = self.last_beat = now

    def detach(self) -> None:
        """The worker was reaped (or never started): drop its handles."""
        if self.pidfd is not None:
            os.close(self.pidfd)         # (for adopted workers this is also the sentinel)
        self.proc = self.sentinel = self.pidfd = None

    def request_stop(self, deadline: float, terminated: bool) -> None:
        """To STOPPING; ``terminated``: SIGTERM is being sent (else the worker
        is left to finish by itself until ``deadline``)."""
        self.change_state(GuestEvent.STOP_REQUESTED)
        self.stop_deadline, self.terminated = deadline, terminated

    def silence_allowed(self, heartbeat_timeout: float, boot_timeout: float) -> float:
        """How long this worker may go without a beat: ``heartbeat_timeout`` once it has
        beaten; before its first beat its boot gets ``boot_timeout`` (killing a slow
        starter only starts another as slow)."""
        if self.state is WorkerState.STARTING:
            return max(heartbeat_timeout, boot_timeout)
        return heartbeat_timeout

    @property
    def alive(self) -> bool:
        """A worker process exists (ours or adopted) and has not been reaped."""
        return self.sentinel is not None

    def send_signal(self, sig: int) -> None:
        """Signal the worker through its pidfd: never a recycled pid."""
        if self.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def sent(self, ident: bytes, msg: WorkerReport | WorkerReply) -> bool:
        """``msg`` claims to come from this guest's worker: its pid and secret token match
        (that its sender really is that pid is checked by the supervisor from the kernel's
        credentials of ``ident``'s connection)."""
        return msg.pid == self.pid and bool(self.token) and msg.token == self.token

    def info(self, now: float, interrupts: dict | None = None) -> GuestInfo:
        """A snapshot for pcibackctl (``now``: time.monotonic(); ``interrupts``: the broker's
        PIRQs of this guest's functions)."""
        alive = self.alive
        return GuestInfo(domid=self.domid, state=self._state, pid=self.pid if alive else None,
                         adopted=self.adopted, restarts=self.restarts, last_exit=self.last_exit,
                         heartbeat_age=round(now - self.last_beat, 3) if alive else None, report=self.report,
                         interrupts=interrupts)
