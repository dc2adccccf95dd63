"""The supervisor: one loop that watches xenstore and keeps one worker per guest.

Wake sources, all polled in one place: the xenstore watch on
``/local/domain/0/backend/pci``, worker exit sentinels, worker messages
(ZeroMQ ROUTER), the control endpoint and a signal pipe.  Signal handlers
only enqueue; all work happens in :meth:`Supervisor.run`.

Workers' interrupt requests are answered by the broker in interrupts.py.
The control endpoint (pcibackctl's socket) is made by the caller through
``open_control`` (see endpoint.py); its commands see the supervisor through
the methods under "what pcibackctl sees".
"""

from __future__ import annotations

import os
import queue
import secrets
import select
import signal
import time
from pathlib import Path

import zmq
from loguru import logger

from pcibackd import __version__
from pcibackd.common import logs
from pcibackd.common.ratelimit import worth_logging
from pcibackd.confspace import PolicyError, PolicyStore
from pcibackd.daemon import systemd
from pcibackd.daemon.adopt import adopt_live_worker
from pcibackd.daemon.backends import BACKEND_ROOT, list_backends, remove_if_domain_gone
from pcibackd.daemon.config import DaemonConfig
from pcibackd.daemon.devicegate import GATE_SOCKET, open_gate, route_to, sent_by
from pcibackd.daemon.endpoint import OpenControl
from pcibackd.daemon.guests import Guest, GuestEvent, describe_exit, exit_event
from pcibackd.daemon.interrupts import Interrupts
from pcibackd.daemon.releases import ReleaseViews
from pcibackd.daemon.spawner import Spawner
from pcibackd.daemon.states import RestartPolicy, WorkerState
from pcibackd.daemon.views import DaemonInfo, GuestInfo
from pcibackd.platform.select import choose_platform, platform_module
from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import (MAX_FRAME, IrqReply, WorkerCommand, WorkerIrqRequest, WorkerReply,
                                  parse_worker_message)
from pcibackd.worker.main import EXIT_DONE, WorkerConfig, run_worker
from pcibackd.xenstore.client import XenStore

MESSAGE_BATCH = 256      # worker messages per wake-up: a flooding worker cannot starve the loop
LIVE = (WorkerState.STARTING, WorkerState.RUNNING)      # states that expect heartbeats


class Supervisor(ReleaseViews):
    """Owns the guests table; see the module docstring for the loop."""

    def __init__(self, cfg: DaemonConfig, open_control: OpenControl, policy: RestartPolicy | None = None):
        self.cfg = cfg
        self.open_control = open_control
        self.policy = policy or RestartPolicy(max_failures=cfg.restart_max_failures,
                                              stable_after=cfg.restart_stable_after)
        self._guests: dict[int, Guest] = {}
        self.signals: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.started = time.time()
        self.platform = choose_platform(cfg.platform, domid=0)
        self.spawner = Spawner(platform_module(cfg.platform))
        self.runtime = Path(cfg.runtime_dir)
        self.malformed = 0
        self.ignored_names: set[str] = set()

    # ------------------------------------------------------------ setup --
    def _setup(self) -> None:
        self.spawner.start()            # before any thread exists
        self.runtime.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime, 0o711)      # traversable: workers and the status group reach their sockets
        self.xs = XenStore(self.cfg.xenstored_path)
        self.gate = open_gate(self.runtime, self.platform, self._guests, self.cfg.xenstored_path)
        self.irq = Interrupts(self.platform, self.runtime)
        self.irq.start(set(list_backends(self.xs, self.ignored_names)))
        self.zctx = zmq.Context()
        self.workers_sock = self.zctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 256), (zmq.MAXMSGSIZE, MAX_FRAME)):
            self.workers_sock.setsockopt(opt, value)
        self.workers_endpoint = f"ipc://{self.runtime / 'workers.sock'}"
        self.workers_sock.bind(self.workers_endpoint)
        self.control = self.open_control(self.zctx, self)
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for sig in SIGNAL_HANDLERS:
            signal.signal(sig, self._on_signal)
        self.xs.watch(BACKEND_ROOT, "backends")

    def _on_signal(self, signum, frame) -> None:
        self.signals.put_nowait(signum)     # no logging here

    # ------------------------------------------------------------- loop --
    def run(self) -> int:
        self._setup()
        self.scan()
        systemd.notify(f"READY=1\nSTATUS=serving {len(self._guests)} guest(s)")
        logger.info("pcibackd {} ready: platform {}, topology {}, runtime {}", __version__,
                    self.cfg.platform, self.cfg.topology, self.runtime)
        poller = zmq.Poller()
        for source in (self.workers_sock, self.control.sock, self.xs.fileno(), self.sig_r):
            poller.register(source, zmq.POLLIN)
        watchdog = systemd.watchdog_interval()
        next_dog = 0.0
        while not self.stopping:
            sentinels = {g.sentinel: g for g in self._guests.values() if g.alive}
            for fd in sentinels:
                poller.register(fd, zmq.POLLIN)
            ready = dict(poller.poll(timeout=self._next_timeout() * 1000))
            for fd in sentinels:
                poller.unregister(fd)
            if self.sig_r in ready:
                self._drain_signals()
            if self.xs.fileno() in ready and self.xs.events():
                self.scan()
            if self.workers_sock in ready:
                self._on_worker_messages()
            if self.control.sock in ready:
                self.control.handle_ready()
            self.control.flush_pending()
            for fd, guest in sentinels.items():
                if fd in ready:
                    self._reap(guest)
            self._manage()
            if watchdog and time.monotonic() >= next_dog:
                systemd.notify("WATCHDOG=1")
                next_dog = time.monotonic() + watchdog
        return self._shutdown()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = [g.restart_at - now for g in self._guests.values() if g.state is WorkerState.BACKOFF]
        control = self.control.next_deadline()
        if control is not None:
            due.append(control - now)
        # wake when a heartbeat deadline passes: a hung worker's pending op is waiting
        timeouts = (self.cfg.heartbeat_timeout, self.cfg.boot_timeout)
        due += [g.last_beat + g.silence_allowed(*timeouts) - now for g in self._guests.values()
                if g.alive and g.state in LIVE]
        return max(0.0, min([0.5, *due]))

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sig_r, 64):
                pass
        except BlockingIOError:
            pass
        while not self.signals.empty():
            SIGNAL_HANDLERS[self.signals.get_nowait()](self)

    def handle_term(self) -> None:
        """SIGTERM/SIGINT: graceful stop; workers finish the op in flight."""
        logger.info("stopping (signal)")
        self.stopping = True

    def handle_hup(self) -> None:
        """SIGHUP: reload the config-space policy in every running worker (as
        ``pcibackctl policy reload`` does, without waiting for answers), then
        rescan xenstore.  A malformed policy file changes nothing."""
        try:
            PolicyStore(self.cfg.policy_path)
        except PolicyError as exc:
            logger.error("SIGHUP: policy not reloaded: {}", exc)
        else:
            domids = [g.domid for g in self._guests.values() if g.alive and g.state is WorkerState.RUNNING]
            sent = sum(self.send_worker(domid, "policy-reload") for domid in domids)
            logger.info("SIGHUP: policy {} sent to {} worker(s)", self.cfg.policy_path or "(built-in)", sent)
        self.scan()

    def handle_chld(self) -> None:      # SIGCHLD: nothing; exit sentinels are polled
        pass

    # ----------------------------------------------------------- guests --
    def scan(self) -> None:
        """Start workers for new backend directories, forget removed ones."""
        present = list_backends(self.xs, self.ignored_names)
        self.irq.sync(self.xs, present)
        for domid, path in present.items():
            known = self._guests.get(domid)
            if (known is not None and known.state is WorkerState.EXITED and not known.alive
                    and self.xs.read(f"{path}/state") in (None, "1")):
                del self._guests[domid]       # a new backend in the same place: serve it afresh
            if domid not in self._guests:
                self._guests[domid] = guest = Guest(domid, path)
                if not adopt_live_worker(self.runtime, guest):
                    logger.info("new PCI backend for domain {}", domid)
                    self._start(guest)
        for domid in [d for d in self._guests if d not in present]:
            guest = self._guests[domid]
            if not guest.alive:
                del self._guests[domid]
                logger.info("domain {} forgotten", domid)
            elif guest.state is not WorkerState.STOPPING:
                # The worker watches the same directory and finishes by itself
                # (resetting its devices); SIGTERM only if it has not within stop_timeout.
                guest.request_stop(time.monotonic() + self.cfg.stop_timeout, terminated=False)

    def _worker_config(self, guest: Guest) -> WorkerConfig:
        c = self.cfg
        return WorkerConfig(domid=guest.domid, backend_path=guest.backend_path, platform=c.platform,
                            xenstored_path=c.xenstored_path, topology=c.topology,
                            poll_window_us=c.poll_window_us, supervisor_endpoint=self.workers_endpoint,
                            heartbeat_interval=c.heartbeat_interval, policy_path=c.policy_path,
                            log_level=c.log_level, state_dir=str(self.runtime), orphan_grace=c.orphan_grace,
                            token=guest.token, device_gate=str(self.runtime / GATE_SOCKET))

    def _start(self, guest: Guest) -> None:
        guest.token = secrets.token_hex(16)
        try:
            guest.proc = self.spawner.spawn(run_worker, self._worker_config(guest), name=f"pcibackd-dom{guest.domid}")
        except Exception as exc:       # e.g. the fork server died (EOFError): a failed start, not our crash
            logger.error("cannot start a worker for domain {}: {!r}", guest.domid, exc)
            self.spawner.restart()
            guest.proc = None
            guest.failures += 1
            guest.change_state(GuestEvent.GAVE_UP if self.policy.gives_up(guest.failures)
                               else GuestEvent.SPAWN_FAILED)
            guest.restart_at = time.monotonic() + max(0.1, self.policy.delay(guest.failures))
            return
        try:
            pidfd = os.pidfd_open(guest.proc.pid)
        except OSError:
            pidfd = None          # already gone: the sentinel reports it
        guest.attach(guest.proc.pid, guest.proc.sentinel, pidfd, adopted=False, now=time.monotonic())
        logger.info("worker for domain {} started: pid {}", guest.domid, guest.pid)

    def _stop(self, guest: Guest) -> None:
        guest.request_stop(time.monotonic() + self.cfg.stop_timeout, terminated=True)
        guest.send_signal(signal.SIGTERM)

    def _reap(self, guest: Guest) -> None:
        if guest.proc is not None:
            guest.proc.join(0)
            code = guest.proc.exitcode
        else:       # adopted, not our child: only its final beat tells a deliberate exit
            r = guest.report
            code = EXIT_DONE if r is not None and r.final and r.pid == guest.pid else None
        guest.detach()
        ran = time.monotonic() - guest.started_at
        guest.last_exit = describe_exit(code)
        event = exit_event(code, stopping=guest.state is WorkerState.STOPPING)
        if event is GuestEvent.LEFT:
            # Stopped from outside, or orphaned while we stalled: the guest still
            # needs service; restart now, without counting a failure.
            guest.change_state(event)
            guest.restart_at = time.monotonic()
            logger.warning("worker for domain {} left ({}); replacing it", guest.domid, guest.last_exit)
            return
        if event is GuestEvent.FINISHED:
            guest.change_state(event)
            logger.info("worker for domain {} finished ({})", guest.domid, guest.last_exit)
            remove_if_domain_gone(self.xs, guest.domid)
            if self.xs.read(f"{guest.backend_path}/frontend") is None:
                del self._guests[guest.domid]
            return
        guest.failures = 1 if ran >= self.policy.stable_after else guest.failures + 1
        if self.policy.gives_up(guest.failures):
            guest.change_state(GuestEvent.GAVE_UP)
            logger.error("worker for domain {} failed {} times in a row ({}): FATAL, not restarting",
                         guest.domid, guest.failures, guest.last_exit)
            return
        guest.change_state(GuestEvent.CRASHED)
        guest.restart_at = time.monotonic() + self.policy.delay(guest.failures)
        logger.warning("worker for domain {} died ({}); restart #{} in {:.2f} s", guest.domid,
                       guest.last_exit, guest.restarts + 1, guest.restart_at - time.monotonic())

    def _manage(self) -> None:
        self._on_worker_messages()      # judge heartbeats on fresh data, not a stalled iteration's
        now = time.monotonic()
        for guest in list(self._guests.values()):
            if guest.state is WorkerState.STOPPING and guest.alive and now > guest.stop_deadline:
                if not guest.terminated:
                    logger.warning("worker for domain {} did not finish after its backend went: SIGTERM",
                                   guest.domid)
                    self._stop(guest)
                else:
                    logger.error("worker for domain {} ignored SIGTERM for {:.0f} s: killing", guest.domid,
                                 self.cfg.stop_timeout)
                    guest.send_signal(signal.SIGKILL)
                    guest.stop_deadline = now + self.cfg.stop_timeout
            elif guest.state is WorkerState.BACKOFF and now >= guest.restart_at:
                guest.restarts += 1
                self._start(guest)
            elif guest.state in LIVE and guest.alive and \
                    now - guest.last_beat > guest.silence_allowed(self.cfg.heartbeat_timeout, self.cfg.boot_timeout):
                logger.error("worker for domain {} (pid {}) missed heartbeats for {:.1f} s: killing",
                             guest.domid, guest.pid, now - guest.last_beat)
                guest.send_signal(signal.SIGKILL)
                guest.last_beat = now   # once per timeout; the sentinel reports the death

    def _on_worker_messages(self) -> None:
        for _ in range(MESSAGE_BATCH):
            try:
                ident, raw = self.workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = parse_worker_message(raw.bytes)
            except Exception as exc:       # anything a peer sends must not reach the loop
                self.malformed += 1
                if worth_logging(self.malformed):
                    logger.warning("malformed message on the worker socket from {!r} ({} so far): {}",
                                   ident.bytes[:16], self.malformed, str(exc)[:120])
                continue
            guest = self._guests.get(msg.domid)
            if guest is None or not guest.sent(ident.bytes, msg) or not sent_by(ident.bytes, raw, guest):
                continue
            guest.last_beat = time.monotonic()
            if isinstance(msg, WorkerIrqRequest):     # the broker serves the sender's guest, nobody else's
                self._send(ident.bytes, IrqReply(msg.id, self.irq.handle(guest.domid, msg.request)).to_json())
                continue
            if isinstance(msg, WorkerReply):
                self.control.worker_reply(msg)
                continue
            guest.report = msg
            guest.change_state(GuestEvent.BEAT)
            self.send_worker(guest.domid, "ack")

    # ---------------------------------------------- what pcibackctl sees --
    def about(self) -> DaemonInfo:
        return DaemonInfo(version=__version__, pid=os.getpid(), uptime=round(time.time() - self.started, 1),
                          platform=self.platform.name, topology=self.cfg.topology,
                          xenstore=self.cfg.xenstored_path or os.environ.get("XENSTORED_PATH", "default"),
                          xenstore_connected=self.xs.connected, control=dict(self.control.endpoints))

    def guests(self) -> list[GuestInfo]:
        """Every guest by domid, with its worker's last report (never waits for a worker)."""
        now = time.monotonic()
        return [self._guests[d].info(now, self.irq.mappings(d)) for d in sorted(self._guests)]

    def assignable(self) -> list[BDF]:
        """Assignable host functions (the platform's: on Xen those bound to a stub driver)."""
        return self.platform.assignable()

    def restart(self, domid: int) -> bool:
        """Replace a guest's worker; FATAL guests get a fresh start.  False: no such guest."""
        guest = self._guests.get(domid)
        if guest is None:
            return False
        guest.failures = 0
        if guest.alive:
            guest.send_signal(signal.SIGKILL)   # the reap path restarts it immediately
        else:
            guest.change_state(GuestEvent.REVIVED)
            guest.restart_at = 0.0
        return True

    def send_worker(self, domid: int, cmd: str, args: dict | None = None, req_id: str | None = None) -> bool:
        """Queue a command for a worker (never blocks; False when it cannot be sent)."""
        return self._send(route_to(self._guests.get(domid)), WorkerCommand(cmd, args or {}, req_id).to_json())

    def _send(self, ident: bytes, data: bytes) -> bool:
        try:
            self.workers_sock.send_multipart([ident, data], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def set_log_level(self, level: str) -> None:
        logs.setup(level)
        self.cfg.log_level = level

    @property
    def policy_path(self) -> str | None:
        return self.cfg.policy_path

    # ---------------------------------------------------------- shutdown --
    def _shutdown(self) -> int:
        systemd.notify("STOPPING=1")
        live = [g for g in self._guests.values() if g.alive]
        for g in live:
            self._stop(g)
        deadline = time.monotonic() + self.cfg.stop_timeout
        for g in live:
            if not select.select([g.sentinel], [], [], max(0.0, deadline - time.monotonic()))[0]:
                logger.warning("worker for domain {} did not stop in time: killing", g.domid)
                g.send_signal(signal.SIGKILL)
                select.select([g.sentinel], [], [], 1.0)
            if g.proc is not None:
                g.proc.join(0)
        self.control.close()
        self.workers_sock.close(0)
        self.zctx.term()
        self.xs.close()
        logger.info("stopped")
        return 0


SIGNAL_HANDLERS = {
    signal.SIGTERM: Supervisor.handle_term,
    signal.SIGINT: Supervisor.handle_term,
    signal.SIGHUP: Supervisor.handle_hup,
    signal.SIGCHLD: Supervisor.handle_chld,
}
