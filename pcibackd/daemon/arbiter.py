"""The supervisor: one loop that watches xenstore and keeps one worker per guest.

Wake sources, all in one epoll set kept for the daemon's life (wakeups.py):
the xenstore watch on ``/local/domain/0/backend/pci``, worker exit sentinels,
worker messages (ZeroMQ ROUTER), the control endpoint and a signal pipe;
deadlines (restarts, stop timeouts, silence checks) are a heap.  Idle guests
cost nothing per wake-up: a worker reports only when something changed, plus
a rare keepalive.  Signal handlers only enqueue; all work happens in
:meth:`Supervisor.run`.

Workers' interrupt requests are answered by the broker in interrupts.py.  The
control endpoint is made by the caller (``open_control``, endpoint.py); its
commands see the supervisor through the methods under "what pcibackctl sees".
"""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path

import zmq
from loguru import logger

from pcibackd import __version__
from pcibackd.common import logs
from pcibackd.common.ratelimit import worth_logging
from pcibackd.daemon import systemd
from pcibackd.daemon.adopt import adopt_live_worker
from pcibackd.daemon.backends import (BACKEND_ROOT, DOMID_FIRST_RESERVED, CachedReads, backend_of, list_backends,
                                     presence_touched, touched_nodes)
from pcibackd.daemon.config import DaemonConfig
from pcibackd.daemon.devicegate import GATE_SOCKET, open_gate, route_to, sent_by
from pcibackd.daemon.endpoint import OpenControl
from pcibackd.daemon.guests import Guest, GuestEvent
from pcibackd.daemon.handover import HANDOVER_LINGER_MS, hand_over
from pcibackd.daemon.interrupts import Interrupts
from pcibackd.daemon.lifecycle import Lifecycle
from pcibackd.daemon.names import TOKEN as NAMES, NameWatch
from pcibackd.daemon.releases import ReleaseViews
from pcibackd.daemon.reload import reload_config_and_policy
from pcibackd.daemon.spawner import Spawner
from pcibackd.daemon.states import RestartPolicy, WorkerState
from pcibackd.daemon.views import DaemonInfo, GuestInfo
from pcibackd.daemon.wakeups import Wakeups
from pcibackd.daemon.workers import WorkerLife, raise_open_file_limit, wait_all
from pcibackd.daemon.xsgate import XsGate
from pcibackd.platform.select import choose_platform, platform_module
from pcibackd.wire.bdf import BDF
from pcibackd.worker.link import (MAX_FRAME, IrqReply, WorkerCommand, WorkerIrqRequest, WorkerReply,
                                  parse_worker_message)
from pcibackd.worker.main import WorkerConfig
from pcibackd.worker.privileges import worker_uid
from pcibackd.xenstore.client import XenStore

MESSAGE_BATCH = 256      # worker messages per wake-up: a flooding worker cannot starve the loop
ACK = WorkerCommand("ack", {}, None).to_json()
IDLE_CAP = 3600.0        # s: the longest wait when nothing is due (no periodic work when idle)


class Supervisor(ReleaseViews, WorkerLife):
    """Owns the guests table; see the module docstring for the loop."""

    def __init__(self, cfg: DaemonConfig, open_control: OpenControl, policy: RestartPolicy | None = None):
        self.cfg = cfg
        self.open_control = open_control
        self.policy = policy or RestartPolicy(max_failures=cfg.restart_max_failures,
                                              stable_after=cfg.restart_stable_after)
        self._guests: dict[int, Guest] = {}
        self.signals: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.handing_over = False       # SIGTERM: leave the workers serving for a successor (lifecycle.py)
        self.started = time.time()
        self.platform = choose_platform(cfg.platform, domid=0)
        self.spawner = Spawner(platform_module(cfg.platform))
        self.runtime = Path(cfg.runtime_dir)
        self.malformed = 0
        self.ignored_names: set[str] = set()
        self.restart_requested: dict[int, bool] = {}     # domids whose worker pcibackctl restarts
        self.status = systemd.Status()
        self._present: dict[int, str] = {}      # {domid: backend path} with a frontend set
        self.wake = Wakeups()
        self._routes: dict[bytes, int] = {}     # a worker connection's routing id -> its guest (keepalives)
        self._described: tuple[int, int] | None = None     # (Guest.changes, guests) behind the last STATUS=

    # ------------------------------------------------------------ setup --
    def _setup(self) -> None:
        limit = raise_open_file_limit()     # first: the fork server and workers inherit it
        if limit < 4 * 256 and worth_logging(1):
            logger.warning("open-file limit {}: fewer than 4 per guest at 256 guests (set LimitNOFILE=)", limit)
        self.spawner.start()            # before any thread exists
        self.runtime.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime, 0o711)      # traversable: workers and the status group reach their sockets
        self.xs = XenStore(self.cfg.xenstored_path)
        self.lifecycle = Lifecycle.start(self.xs, self.platform, self.cfg)    # [devices] hide: before any guest
        self.reads = CachedReads(self.xs)
        self.gate = open_gate(self.runtime, self.platform, self._guests, self.cfg.xenstored_path)
        self.xsgate = XsGate(self.runtime, self.spawner, self.cfg.xenstored_path, self.cfg.log_level)
        self.irq = Interrupts(self.platform, self.runtime)
        self.irq.start(set(list_backends(self.xs, self.ignored_names)))
        self.zctx = zmq.Context()
        self.workers_sock = self.zctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 256), (zmq.MAXMSGSIZE, MAX_FRAME)):
            self.workers_sock.setsockopt(opt, value)
        self.workers_endpoint = f"ipc://{self.runtime / 'workers.sock'}"
        self.workers_sock.bind(self.workers_endpoint)
        os.chmod(self.runtime / "workers.sock", 0o666)     # workers run as uids of their own (devicegate.sent_by)
        self.control = self.open_control(self.zctx, self)
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for sig in SIGNAL_HANDLERS:
            signal.signal(sig, self._on_signal)
        self.xs.watch(BACKEND_ROOT, "backends")
        self.names = NameWatch(self.xs)

    def _on_signal(self, signum, frame) -> None:
        self.signals.put_nowait(signum)     # no logging here

    # ------------------------------------------------------------- loop --
    def run(self) -> int:
        self._setup()
        self.scan()
        self.status.update(systemd.describe(g.state for g in self._guests.values()), also="READY=1")
        logger.info("pcibackd {} ready: platform {}, topology {}, runtime {}", __version__,
                    self.cfg.platform, self.cfg.topology, self.runtime)
        wake = self.wake
        for key, fd in (("workers", self.workers_sock.getsockopt(zmq.FD)),
                        ("control", self.control.sock.getsockopt(zmq.FD)), ("xs", self.xs.fileno()),
                        ("signal", self.sig_r)):
            wake.watch(fd, key)
        watchdog = systemd.watchdog_interval()
        next_dog = 0.0
        readable = zmq.POLLIN
        while not self.stopping:
            # ZeroMQ's fds are edge-triggered: a socket left readable (a batch cut short) means no wait.
            more = bool(self.workers_sock.getsockopt(zmq.EVENTS) & readable
                        or self.control.sock.getsockopt(zmq.EVENTS) & readable)
            cap = IDLE_CAP
            control = self.control.next_deadline()
            if control is not None:
                cap = min(cap, control - time.monotonic())
            if watchdog:
                cap = min(cap, next_dog - time.monotonic())
            ready = wake.wait(max(0.0, cap), at_once=more)
            if "signal" in ready:
                self._drain_signals()
            if "xs" in ready:
                self._on_xs_events()
            self._on_worker_messages()
            self.control.handle_ready()
            self.control.flush_pending()
            for key in ready:
                guest = self._guests.get(key) if isinstance(key, int) else None
                if guest is not None and guest.alive:
                    self._reap(guest)
            self._on_due()
            if (Guest.changes, len(self._guests)) != self._described:     # not O(guests) on every wake-up
                self._described = (Guest.changes, len(self._guests))
                self.status.update(systemd.describe(g.state for g in self._guests.values()))
            if watchdog and time.monotonic() >= next_dog:
                systemd.notify("WATCHDOG=1")
                next_dog = time.monotonic() + watchdog
        return self._shutdown()

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sig_r, 64):
                pass
        except BlockingIOError:
            pass
        while not self.signals.empty():
            SIGNAL_HANDLERS[self.signals.get_nowait()](self)

    def handle_term(self) -> None:
        """SIGTERM (systemctl stop or restart, alike): exit, handing the workers over to a successor."""
        logger.info("stopping (SIGTERM): handing the workers over")
        self.stopping = True
        self.handing_over = self.cfg.handover_grace > 0

    def handle_int(self) -> None:
        """SIGINT (Ctrl-C in the foreground): graceful stop; workers finish the op in flight."""
        logger.info("stopping (SIGINT): stopping the workers")
        self.stopping = True
        self.handing_over = False

    def handle_hup(self) -> None:
        """SIGHUP (``systemctl reload``): config and policy read again, then a rescan (reload.py)."""
        running = [g.domid for g in self._guests.values() if g.alive and g.state is WorkerState.RUNNING]
        reload_config_and_policy(self, running)

    def handle_chld(self) -> None: pass     # SIGCHLD: nothing; exit sentinels are polled

    # ----------------------------------------------------------- guests --
    def scan(self) -> None:
        """Read every backend directory again: start workers for new ones, stop removed ones."""
        present = list_backends(self.xs, self.ignored_names)
        self.reads.cache.clear()
        self._present = present
        self.irq.sync(self.reads, present)
        self._apply(set(present) | set(self._guests))

    def _on_xs_events(self) -> None:
        """Follow a batch of watch events: only the domains they touched are read again."""
        events = self.xs.events()
        self.names.renamed(events, self._guests)
        untrusted_paths = [p for p, token in events if token != NAMES]
        if not untrusted_paths:
            return
        found = touched_nodes(untrusted_paths, self.ignored_names)
        if found is None:
            self.scan()
            return
        touched, listings = found
        before = set(self._present)
        presence = presence_touched(untrusted_paths)
        for domid in touched:
            if domid in before and domid not in presence:
                continue            # a present backend's state or devices: still present
            path = backend_of(self.xs, domid) if 0 < domid < DOMID_FIRST_RESERVED else None
            if path is None:
                self._present.pop(domid, None)
            else:
                self._present[domid] = path
        self.reads.forget_nodes(untrusted_paths)      # what changed, not the domains' every node
        for domid in set(self._present) ^ before:
            self.reads.forget(domid)
        if listings or set(self._present) != before:    # a worker's own state writes need no broker scan
            self.irq.sync(self.reads, self._present)
        if touched:
            self._apply(touched)

    def _apply(self, domids) -> None:
        """Bring the guests of ``domids`` in line with :attr:`_present`."""
        for domid in sorted(domids):
            path = self._present.get(domid)
            known = self._guests.get(domid)
            if path is not None:
                if (known is not None and known.state is WorkerState.EXITED and not known.alive
                        and self.xs.read(f"{path}/state") in (None, "1")):
                    del self._guests[domid]       # a new backend in the same place: serve it afresh
                if domid not in self._guests:
                    self._guests[domid] = guest = Guest(domid, path, name=self.names.follow(domid))
                    if adopt_live_worker(self.runtime, guest):
                        self._attached(guest)
                    else:
                        logger.info("new PCI backend for domain {}", domid)
                        self._start(guest)
            elif known is not None:
                if not known.alive:
                    del self._guests[domid]
                    self.names.forget(domid)
                    logger.info("domain {} forgotten", domid)
                elif known.state is not WorkerState.STOPPING:
                    # The worker finishes by itself (resets its devices); SIGTERM after stop_timeout.
                    known.request_stop(time.monotonic() + self.cfg.stop_timeout, terminated=False)
                    self.wake.at(known.stop_deadline, domid, "stop")
        if self.lifecycle.wants_events(domids):       # only the backends it follows are read
            self.lifecycle.backends_changed(domids)

    def _worker_config(self, guest: Guest) -> WorkerConfig:
        c = self.cfg
        return WorkerConfig(domid=guest.domid, backend_path=guest.backend_path, platform=c.platform,
                            xenstored_path=c.xenstored_path, topology=c.topology,
                            poll_window_us=c.poll_window_us, supervisor_endpoint=self.workers_endpoint,
                            heartbeat_interval=c.heartbeat_interval, policy_path=c.policy_path,
                            log_level=c.log_level, state_dir=str(self.runtime), orphan_grace=c.orphan_grace,
                            stuck_op_seconds=c.stuck_op_seconds, uid=worker_uid(c.worker_uid_base, guest.domid),
                            token=guest.token, device_gate=str(self.runtime / GATE_SOCKET),
                            xenstore_sock=self.xsgate.pair(guest.domid))

    def _on_worker_messages(self) -> None:
        for _ in range(MESSAGE_BATCH):
            try:
                ident, raw = self.workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:
                continue
            guest = self._guests.get(self._routes.get(ident.bytes))
            if guest is not None and guest.route == ident.bytes and guest.last_frame == raw.bytes and guest.alive:
                # An idle worker's keepalive: the very report accepted last time, on the
                # connection its kernel-checked pid spoke on, so it needs no parsing again.
                guest.last_beat = self.wake.clock()
                guest.change_state(GuestEvent.BEAT)
                self._send(ident.bytes, ACK)
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
            guest.last_beat = self.wake.clock()
            if isinstance(msg, WorkerIrqRequest):     # the broker serves the sender's guest, nobody else's
                self._send(ident.bytes, IrqReply(msg.id, self.irq.handle(guest.domid, msg.request)).to_json())
                continue
            if isinstance(msg, WorkerReply):
                self.control.worker_reply(msg)
                continue
            guest.report, guest.last_frame = msg, raw.bytes
            self._routes[ident.bytes] = guest.domid
            if len(self._routes) > 2 * len(self._guests) + 64:     # routes of dead workers: amortised pruning
                self._routes = {g.route: d for d, g in self._guests.items() if g.route}
            guest.change_state(GuestEvent.BEAT)
            self._send(ident.bytes, ACK)

    # ---------------------------------------------- what pcibackctl sees --
    def about(self) -> DaemonInfo:
        return DaemonInfo(version=__version__, pid=os.getpid(), uptime=round(time.time() - self.started, 1),
                          platform=self.platform.name, topology=self.cfg.topology,
                          xenstore=self.cfg.xenstored_path or os.environ.get("XENSTORED_PATH", "default"),
                          xenstore_connected=self.xs.connected, control=dict(self.control.endpoints))

    def guests(self) -> list[GuestInfo]:
        """Every guest by domid, with its worker's last report (never waits for a worker)."""
        now, irq = self.wake.clock(), self.irq.statuses()
        return [self._guests[d].info(now, irq.get(d, {})) for d in sorted(self._guests)]

    def observe_cpu(self, domid: int, pid: int, seconds: float) -> float | None:
        """A worker's CPU time as the control endpoint read it from /proc (into its guest's totals)."""
        guest = self._guests.get(domid)
        return guest.tally.observe_cpu(pid, seconds) if guest is not None else None

    def assignable(self) -> list[BDF]:
        """Assignable host functions (the platform's: on Xen those bound to a stub driver)."""
        return self.platform.assignable()

    def restart(self, domid: int) -> bool:
        """Replace a guest's worker; FATAL guests get a fresh start.  False: no such guest."""
        guest = self._guests.get(domid)
        if guest is None:
            return False
        guest.failures = guest.kills = 0
        logger.info("restart of domain {}'s worker requested", domid)
        if guest.alive:
            self.restart_requested[domid] = True
            guest.send_signal(signal.SIGKILL)   # the reap path restarts it immediately
        else:
            guest.change_state(GuestEvent.REVIVED)
            self._restart_in(guest, 0.0)
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
        live = {g.sentinel: g for g in self._guests.values() if g.alive}
        if self.handing_over:
            live = hand_over(self, live)
        for g in live.values():
            self._stop(g)
        left = wait_all(live, time.monotonic() + self.cfg.stop_timeout)
        for g in left.values():
            logger.warning("worker for domain {} did not stop in time: killing", g.domid)
            g.send_signal(signal.SIGKILL)
        wait_all(left, time.monotonic() + 1.0)
        for g in live.values():
            if g.proc is not None:
                g.proc.join(0)
        self.xsgate.close(stop=not self.handing_over)
        self.control.close()
        self.workers_sock.close(HANDOVER_LINGER_MS if self.handing_over else 0)    # the handover frames go out
        self.zctx.term()
        self.xs.close()
        self.wake.close()
        logger.info("stopped")
        return 0


SIGNAL_HANDLERS = {
    signal.SIGTERM: Supervisor.handle_term,
    signal.SIGINT: Supervisor.handle_int,
    signal.SIGHUP: Supervisor.handle_hup,
    signal.SIGCHLD: Supervisor.handle_chld,
}
