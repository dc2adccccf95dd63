"""A guest's worker from start to exit: spawning, reaping, and the deadlines (a mixin of the Supervisor).

The restart rule (documented in docs/architecture.md): a worker's exit is
judged by ``exit_event`` (guests.py).  Its own failures (an exception, its op
watchdog, a fatal signal of its own, our kill after it went silent) back off
and, ``max_failures`` in a row, make the guest FATAL; kills from outside
(SIGKILL, the OOM killer) only back off, so they never become an outage.
"""

from __future__ import annotations

import resource
import secrets
import select
import signal
import time

from loguru import logger

from pcibackd.daemon.backends import remove_if_domain_gone
from pcibackd.daemon.guests import Guest, GuestEvent, describe_exit, exit_event
from pcibackd.daemon.states import WorkerState
from pcibackd.worker.main import EXIT_DONE, run_worker

LIVE = (WorkerState.STARTING, WorkerState.RUNNING)      # states that expect reports


class WorkerLife:
    """Needs from the Supervisor: cfg, policy, spawner, xs, names, wake, _guests, restart_requested,
    _worker_config and _on_worker_messages."""

    def _start(self, guest: Guest) -> None:
        guest.token = secrets.token_hex(16)
        try:
            config = self._worker_config(guest)
            try:
                guest.proc = self.spawner.spawn(run_worker, config, name=f"pcibackd-dom{guest.domid}")
            finally:
                if config.xenstore_sock is not None:
                    config.xenstore_sock.close()       # the worker has its own copy
        except Exception as exc:       # e.g. the fork server died (EOFError): a failed start, not our crash
            logger.error("cannot start a worker for domain {}: {!r}", guest.domid, exc)
            self.spawner.restart()
            guest.proc = None
            guest.failures += 1
            guest.change_state(GuestEvent.GAVE_UP if self.policy.gives_up(guest.failures)
                               else GuestEvent.SPAWN_FAILED)
            self._restart_in(guest, max(0.1, self.policy.delay(guest.failures)))
            return
        # One fd per worker here: the fork server's sentinel (signals open a pidfd each time).
        guest.attach(guest.proc.pid, guest.proc.sentinel, None, adopted=False, now=time.monotonic())
        self._attached(guest)
        logger.info("worker for domain {} started: pid {}", guest.domid, guest.pid)

    def _attached(self, guest: Guest) -> None:
        guest.last_beat = self.wake.clock()
        self.wake.unwatch(guest.sentinel)
        self.wake.watch(guest.sentinel, guest.domid)
        self.wake.at(time.monotonic() + self._silence_allowed(guest), guest.domid, "silence")

    def _silence_allowed(self, guest: Guest) -> float:
        return guest.silence_allowed(self.cfg.heartbeat_timeout, self.cfg.boot_timeout)

    def _restart_in(self, guest: Guest, delay: float) -> None:
        guest.restart_at = time.monotonic() + delay
        self.wake.at(guest.restart_at, guest.domid, "restart")

    def _stop(self, guest: Guest) -> None:
        guest.request_stop(time.monotonic() + self.cfg.stop_timeout, terminated=True)
        guest.send_signal(signal.SIGTERM)
        self.wake.at(guest.stop_deadline, guest.domid, "stop")

    def _reap(self, guest: Guest) -> None:
        self.wake.unwatch(guest.sentinel)
        if guest.proc is not None:
            guest.proc.join(0)
            code = guest.proc.exitcode
        else:       # adopted, not our child: only its final beat tells a deliberate exit
            r = guest.report
            code = EXIT_DONE if r is not None and r.final and r.pid == guest.pid else None
        guest.detach()
        was_running = guest.state is WorkerState.RUNNING
        ran = time.monotonic() - guest.started_at
        guest.last_exit = describe_exit(code)
        event = exit_event(code, guest.state is WorkerState.STOPPING, guest.killed_for_silence)
        if self.restart_requested.pop(guest.domid, False) and event in (GuestEvent.CRASHED, GuestEvent.KILLED):
            guest.change_state(GuestEvent.LEFT)
            self._restart_in(guest, 0.0)
            logger.info("worker for domain {} stopped for the requested restart; replacing it", guest.domid)
            return
        if event is GuestEvent.LEFT:
            # Stopped from outside, or orphaned while we stalled: the guest still
            # needs service; restart now, without counting a failure.
            guest.change_state(event)
            self._restart_in(guest, 0.0)
            logger.warning("worker for domain {} left ({}); replacing it", guest.domid, guest.last_exit)
            return
        if event is GuestEvent.FINISHED:
            guest.change_state(event)
            logger.info("worker for domain {} finished ({})", guest.domid, guest.last_exit)
            remove_if_domain_gone(self.xs, guest.domid)
            if self.xs.read(f"{guest.backend_path}/frontend") is None:
                del self._guests[guest.domid]
                self.names.forget(guest.domid)
            return
        if event is GuestEvent.KILLED:     # not the guest's doing: never FATAL (states.RestartPolicy)
            # A worker that was serving (RUNNING) or ran a while was killed once, not in a loop.
            isolated = was_running or ran >= self.policy.kill_stable_after
            guest.kills = 1 if isolated else guest.kills + 1
            guest.change_state(event)
            self._restart_in(guest, self.policy.kill_delay(guest.kills))
            logger.warning("worker for domain {} was killed from outside ({}); restart #{} in {:.2f} s",
                           guest.domid, guest.last_exit, guest.restarts + 1, guest.restart_at - time.monotonic())
            return
        guest.failures = 1 if ran >= self.policy.stable_after else guest.failures + 1
        if self.policy.gives_up(guest.failures):
            guest.change_state(GuestEvent.GAVE_UP)
            logger.error("worker for domain {} failed {} times in a row ({}): FATAL, not restarting",
                         guest.domid, guest.failures, guest.last_exit)
            return
        guest.change_state(GuestEvent.CRASHED)
        self._restart_in(guest, self.policy.delay(guest.failures))
        logger.warning("worker for domain {} died ({}); restart #{} in {:.2f} s", guest.domid,
                       guest.last_exit, guest.restarts + 1, guest.restart_at - time.monotonic())

    def _on_due(self) -> None:
        """Act on the deadlines that came due (each re-checked: heap entries are hints)."""
        now = time.monotonic()
        for domid, kind in self.wake.due(now):
            guest = self._guests.get(domid)
            if guest is not None:
                DUE[kind](self, guest, now)

    def _due_restart(self, guest: Guest, now: float) -> None:
        if guest.state is WorkerState.BACKOFF and not guest.alive:
            if now >= guest.restart_at:
                guest.restarts += 1
                self._start(guest)
            else:
                self.wake.at(guest.restart_at, guest.domid, "restart")

    def _due_stop(self, guest: Guest, now: float) -> None:
        if guest.state is not WorkerState.STOPPING or not guest.alive:
            return
        if now < guest.stop_deadline:
            self.wake.at(guest.stop_deadline, guest.domid, "stop")
        elif not guest.terminated:
            logger.warning("worker for domain {} did not finish after its backend went: SIGTERM", guest.domid)
            self._stop(guest)
        else:
            logger.error("worker for domain {} ignored SIGTERM for {:.0f} s: killing", guest.domid,
                         self.cfg.stop_timeout)
            guest.send_signal(signal.SIGKILL)
            guest.stop_deadline = now + self.cfg.stop_timeout
            self.wake.at(guest.stop_deadline, guest.domid, "stop")

    def _due_silence(self, guest: Guest, now: float) -> None:
        """The backstop for a worker hung outside an op (its own watchdog covers ops):
        silence is measured on the loop's own clock, so our stalls never count."""
        if not guest.alive or guest.state not in LIVE:
            return
        self._on_worker_messages()      # judge on fresh data, not a stalled iteration's
        allowed = self._silence_allowed(guest)
        silent = self.wake.clock() - guest.last_beat
        if silent > allowed:
            logger.error("worker for domain {} (pid {}) missed heartbeats for {:.1f} s: killing",
                         guest.domid, guest.pid, silent)
            guest.killed_for_silence = True
            guest.send_signal(signal.SIGKILL)
            guest.last_beat = self.wake.clock()      # once per timeout; the sentinel reports the death
            silent = 0.0
        self.wake.at(now + allowed - silent, guest.domid, "silence")



DUE = {"restart": WorkerLife._due_restart, "stop": WorkerLife._due_stop, "silence": WorkerLife._due_silence}


def wait_all(by_fd: dict, deadline: float) -> dict:
    """Wait (poll, any number of fds) until every fd in ``by_fd`` is readable or
    ``deadline`` passes; the entries still not readable."""
    left = dict(by_fd)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    while left and (timeout := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(int(timeout * 1000) + 1):
            poller.unregister(fd)
            left.pop(fd, None)
    return left


def raise_open_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (one fd per worker, plus ZeroMQ's); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from {} to {}: {}", soft, hard, exc)
    return soft
