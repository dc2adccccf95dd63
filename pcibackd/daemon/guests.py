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
import select
import signal
from dataclasses import dataclass, field
from typing import ClassVar

from loguru import logger

from pcibackd.daemon.states import WorkerState
from pcibackd.daemon.tally import Tally
from pcibackd.daemon.views import GuestInfo
from pcibackd.worker.link import WorkerReply, WorkerReport
from pcibackd.worker.main import EXIT_DONE, EXIT_ORPHANED, EXIT_STOPPED


def _pidfd_signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class GuestEvent(enum.Enum):
    SPAWNED = "spawned"                  # a worker process was started
    SPAWN_FAILED = "spawn failed"        # starting one failed (e.g. the fork server died)
    ADOPTED = "adopted"                  # a previous supervisor's live worker was taken over
    BEAT = "beat"                        # an authenticated heartbeat arrived
    STOP_REQUESTED = "stop requested"    # the backend went, the daemon stops, or SIGTERM is due
    FINISHED = "finished"                # the worker exited on purpose, or after a stop request
    LEFT = "left"                        # stopped from outside or orphaned: the guest still needs service
    CRASHED = "crashed"                  # the worker's own failure: counts toward FATAL
    KILLED = "killed"                    # killed from outside (SIGKILL, OOM): restart, never FATAL
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
    (S.STARTING, E.KILLED): S.BACKOFF,
    (S.STARTING, E.GAVE_UP): S.FATAL,
    (S.RUNNING, E.BEAT): S.RUNNING,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPING,
    (S.RUNNING, E.FINISHED): S.EXITED,
    (S.RUNNING, E.LEFT): S.BACKOFF,
    (S.RUNNING, E.CRASHED): S.BACKOFF,
    (S.RUNNING, E.KILLED): S.BACKOFF,
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


# Signals a process raises against itself (a fault in its own code): they count
# as the worker's failure.  Any other signal (SIGKILL from an admin, the OOM
# killer, a chaos test) comes from outside and does not.
OWN_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                         signal.SIGSYS, signal.SIGTRAP, signal.SIGXCPU, signal.SIGXFSZ})


def exit_event(code: int | None, stopping: bool, killed_for_silence: bool = False) -> GuestEvent:
    """What a worker's exit status means (``None``: unknown, an adopted worker).

    CRASHED (the worker's own failure: an exception, its op watchdog, a fatal
    signal of its own, or our kill after it went silent) counts toward FATAL;
    KILLED (any other signal, or an unknown status) never does.  GAVE_UP is the
    restart policy's call, made on CRASHED."""
    if code in (EXIT_STOPPED, EXIT_ORPHANED) and not stopping:
        return GuestEvent.LEFT
    if stopping or code == EXIT_DONE:
        return GuestEvent.FINISHED
    if killed_for_silence:
        return GuestEvent.CRASHED
    if code is None or (code < 0 and -code not in OWN_SIGNALS):
        return GuestEvent.KILLED
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

    changes: ClassVar[int] = 0       # state changes of every guest so far (STATUS= is redone only after one)
    domid: int
    backend_path: str
    proc: object = None              # our child (from the spawner), or None
    pid: int | None = None
    sentinel: int | None = None      # readable when the worker exits (proc.sentinel or a pidfd)
    pidfd: int | None = None         # an adopted worker's (also its sentinel); ours get one per signal
    adopted: bool = False            # left running by a previous supervisor
    token: str = ""                  # the worker proves its messages with this
    route: bytes | None = None       # its link's routing id, learned from its first message its pid sent
    stop_deadline: float = 0.0
    terminated: bool = False         # SIGTERM already sent while STOPPING
    restarts: int = 0
    failures: int = 0                # own failures in a row (toward FATAL)
    kills: int = 0                   # outside kills in a row, each soon after its start (backoff only)
    killed_for_silence: bool = False     # our SIGKILL after the worker went silent (counts as its failure)
    started_at: float = 0.0
    restart_at: float = 0.0
    last_beat: float = 0.0
    last_frame: bytes = b""          # the last report as it came (a keepalive repeats it byte for byte)
    last_exit: str = ""
    name: str = ""                   # the domain's name in xenstore ("" if not known)
    tally: Tally = field(default_factory=Tally, repr=False)   # counters over all its workers
    _report: WorkerReport | None = field(default=None, init=False, repr=False)
    _state: WorkerState = field(default=WorkerState.NEW, init=False, repr=False)

    @property
    def report(self) -> WorkerReport | None:
        """The last heartbeat; setting it also adds it to :attr:`tally`."""
        return self._report

    @report.setter
    def report(self, msg: WorkerReport | None) -> None:
        self._report = msg
        if msg is not None:
            self.tally.add(msg)

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
            Guest.changes += 1
        self._state = new
        return new

    def attach(self, pid: int, sentinel: int, pidfd: int | None, adopted: bool, now: float) -> None:
        """A worker now serves this guest: one we spawned, or one we adopted."""
        self.pid, self.sentinel, self.pidfd, self.adopted = pid, sentinel, pidfd, adopted
        self.killed_for_silence, self.last_frame = False, b""
        self.route = None
        self.change_state(GuestEvent.ADOPTED if adopted else GuestEvent.SPAWNED)
        self.started_at = self.last_beat = now

    def detach(self) -> None:
        """The worker was reaped (or never started): drop its handles."""
        if self.pidfd is not None:
            os.close(self.pidfd)         # (for adopted workers this is also the sentinel)
        self.proc = self.sentinel = self.pidfd = None
        self.last_frame = b""

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
        """Signal the worker through a pidfd: never a recycled pid.

        Our own workers get a pidfd only for the signal (one fd per worker, the
        sentinel, stays open): it is opened while the sentinel is not readable,
        that is before the fork server reaped the worker, so it names the worker."""
        if self.pidfd is not None:
            _pidfd_signal(self.pidfd, sig)
            return
        if self.pid is None or self.sentinel is None:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return
        try:
            if not _readable(self.sentinel):
                _pidfd_signal(fd, sig)
        finally:
            os.close(fd)

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
                         interrupts=interrupts, name=self.name,
                         totals=self.tally.totals() if self._report is not None else None)
