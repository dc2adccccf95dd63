"""One guest's worker process: xenbus backend + op service for one frontend.

Driver: the process itself (signals, poll, pid file, privileges).

Started by the supervisor from a clean (thread-free) spawner; everything that
starts threads (the xenstore client, ZeroMQ, logging sinks) is created here,
after the fork.  The loop blocks on the event channel, the xenstore watch fd,
the supervisor socket and a signal wake-up pipe; signal handlers only set a
flag.

Exit codes (the supervisor's restart policy reads them):

    0  done (guest gone, teardown finished): not restarted
    1  crashed (an exception escaped the loop): restarted
    3  boot failed (xenstore or platform unavailable): restarted with backoff
    4  stopped by SIGTERM (graceful stop): not restarted by this supervisor
    5  orphaned (no supervisor acknowledged it within orphan_grace)
       (a supervisor that handed over on SIGTERM and no successor within its
       handover grace: 4, as a stop)
    6  stuck: an op stayed pending on this worker's own account (see stuck.py)

Idle costs nothing: the loop blocks without a timeout except for the rare
keepalive (``heartbeat_interval``, which also tells an orphan it has no
supervisor); a report goes to the supervisor only when something changed
(ops served, xenbus events, commands), at most every :data:`REPORT_EVERY`.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from pcibackd.common import logs, proctitle
from pcibackd.common.files import write_atomic
from pcibackd.platform.select import choose_platform
from pcibackd.wire.bdf import BDF
from pcibackd.worker import faults, privileges, seccomp
from pcibackd.worker.confine import confine_paths, runtime_dir_for
from pcibackd.worker.devices import DeviceSet
from pcibackd.worker.driver import Driver
from pcibackd.worker.interrupts import MsiService
from pcibackd.worker.ops import Dispatcher
from pcibackd.worker.oploop import OpLoop, Ring
from pcibackd.worker.reporter import Reporter
from pcibackd.worker.stuck import OpWatchdog, StuckOp
from pcibackd.worker.xenbus import BackendMachine
from pcibackd.xenstore.client import XenStore

EXIT_DONE = 0            # guest went away / teardown finished: do not restart
EXIT_CRASHED = 1         # an exception escaped: restart
EXIT_BOOT_FAILED = 3     # could not set up (xenstore, platform): restart with backoff
EXIT_STOPPED = 4         # SIGTERM: stopped serving, xenbus state left for a successor
EXIT_ORPHANED = 5        # no supervisor within the grace period: state left for a successor
EXIT_STUCK = 6           # an op stayed pending on this worker's own account (worker/stuck.py): restart

REPORT_EVERY = 0.2       # s: a changed report waits at least this long after the previous one
HANDOVER_BEAT = 0.25     # s: keepalive while handed over, so a successor hears from us (and acks) at once


@dataclass
class WorkerConfig:
    """Everything a worker needs; plain data so it crosses the spawner."""

    domid: int
    backend_path: str
    platform: str = "xen"          # a platform spec (pcibackd.platform.select)
    xenstored_path: str | None = None
    topology: str = "vpci"
    poll_window_us: float = 50.0
    supervisor_endpoint: str | None = None
    heartbeat_interval: float = 20.0   # keepalive when idle (reports on change come sooner)
    policy_path: str | None = None
    log_level: str = "INFO"
    state_dir: str | None = None
    orphan_grace: float = 60.0     # no supervisor ack for this long: exit cleanly
    stuck_op_seconds: float = 0.9  # own time on one op before the worker ends itself (stuck.py)
    token: str = ""                # proves beats come from this worker (see supervisor)
    device_gate: str | None = None  # the supervisor's device gate socket; None: open devices here
    uid: int | None = None         # run as this uid and gid once set up (privileges.worker_uid); None: stay root
    xenstore_sock: socket.socket | None = None  # its end of the xenstore gate; None: connect to xenstored


class Worker:
    """The worker's objects and its main loop (see module docstring)."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        points = faults.active(cfg.domid)
        if "boot-crash" in points:
            raise faults.InjectedFault("injected boot crash")
        if "boot-slow" in points:
            time.sleep(faults.BOOT_SLOW)
        # Through the xenstore gate when the supervisor gave us its end (daemon/xsgate.py).
        self.xs = XenStore(cfg.xenstored_path, sock=cfg.xenstore_sock)
        self.platform = choose_platform(cfg.platform, domid=0)
        # Opened now, while this process may: after the drop it maps and binds only through these.
        self.platform.open_handles()
        self.evtchn = self.platform.open_evtchn()      # one handle for every ring this worker maps
        self.dispatcher = Dispatcher()
        self.devices = DeviceSet(cfg, self.dispatcher, self.platform, runtime_dir_for(cfg))
        dispatch = self.dispatcher.dispatch
        if points:
            dispatch = faults.wrap_dispatch(dispatch, points, self.devices.state_dir, cfg.domid)
        self.watchdog = OpWatchdog.after(cfg.stuck_op_seconds)
        self.loop = OpLoop(self.dispatcher, cfg.poll_window_us * 1e-6, dispatch=dispatch, watchdog=self.watchdog)
        self.machine = BackendMachine(mode=cfg.topology, host_facts=self.devices.host_facts)
        self.driver = Driver(self.xs, cfg.domid, cfg.backend_path, self.machine, self)
        self.reporter = Reporter(cfg, self) if cfg.supervisor_endpoint else None
        self.msi: MsiService | None = None
        if self.reporter:           # PIRQs come from the supervisor's broker, or MSI is not offered
            self.msi = MsiService(cfg.domid, self._ask, self.reporter.tell, self.devices.find,
                                  self.devices.opener.peek)
            self.msi.install(self.dispatcher.external)
        self.stopping = False
        self.orphaned = False
        self.last_ack = time.monotonic()
        self.handover_until: float | None = None   # our supervisor left on SIGTERM: wait this long for another
        self.exit_note: str | None = None

    def _ask(self, request):
        """A broker question: the supervisor's answer time is not this worker's (op watchdog paused)."""
        with self.watchdog.paused():
            return self.reporter.ask(request)

    # --- actions the driver calls (raise OSError on failure) --------------
    def export(self, placement, opts, resume: bool = False) -> None:
        self.devices.export(placement, opts, resume)

    def remove(self, hosts: tuple[BDF, ...]) -> None:
        self.loop.flush()
        if self.msi:                  # interrupts off and unmapped by the broker before the reset
            self.msi.leave(hosts)
        self.devices.remove(hosts)

    def map_ring(self, gref: int, port: int) -> None:
        page = self.platform.map_grant(self.cfg.domid, gref)
        try:
            local = self.evtchn.bind_interdomain(self.cfg.domid, port)
        except OSError:
            page.close()
            raise
        self.loop.ring = Ring(page, self.evtchn, local, owns_channel=False)
        logger.info("connected: gref {} port {} -> local port {}", gref, port, local)
        # A request left pending by a crashed predecessor is answered now.
        if self.msi:
            self.msi.reserving = True
        try:
            if self.loop.serve_pending():
                logger.info("served an op left pending before this worker started")
        finally:
            if self.msi:
                self.msi.reserving = False

    def unmap_ring(self) -> None:
        if self.loop.ring:
            self.loop.flush()
            self.loop.ring.close()
            self.loop.ring = None

    # --- main loop --------------------------------------------------------
    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self.watchdog.install()
        if self.cfg.device_gate:         # devices come as descriptors: serve unprivileged from the start
            self._confine()
            self.driver.start()
        else:
            self.driver.start()          # the initial export opens device files itself
            self._confine()
        # One poll set, kept: only the ring's fd comes and goes (map/unmap).
        poller = select.poll()
        link_fds = [self.reporter.fileno(), self.reporter.monitor_fileno()] if self.reporter else []
        for fd in (self.xs.fileno(), rfd, *link_fds):
            poller.register(fd, select.POLLIN)
        monitor_fd = link_fds[1] if link_fds else None
        xs_fd, link_fd, ring_fd = self.xs.fileno(), self.reporter.fileno() if self.reporter else None, None
        keepalive = min(self.cfg.heartbeat_interval, self.cfg.orphan_grace / 3)   # an orphan notices in time
        next_keepalive = 0.0     # the first report goes at once: the supervisor waits for it
        next_report = None       # something changed: report at this time (at most every REPORT_EVERY)
        while self.driver.exit_reason is None and not self.stopping:
            if self.loop.fileno() != ring_fd:
                if ring_fd is not None:
                    poller.unregister(ring_fd)
                ring_fd = self.loop.fileno()
                if ring_fd is not None:
                    poller.register(ring_fd, select.POLLIN)
            now = time.monotonic()
            if self.handover_until is not None and now >= self.handover_until:
                logger.info("no supervisor took over within the handover grace: stopping, state left for a "
                            "successor")
                self.exit_note = "handed over, no successor"
                break
            if self.reporter and (now >= next_keepalive or (next_report is not None and now >= next_report)):
                self.reporter.beat(fresh=next_report is not None)     # a bare keepalive resends the last one
                if now - self.last_ack > self.cfg.orphan_grace:
                    logger.warning("no supervisor for {:.0f} s: exiting", now - self.last_ack)
                    self.orphaned = True
                    break
                beat_every = keepalive if self.handover_until is None else HANDOVER_BEAT
                next_keepalive, next_report = now + beat_every, None
            if self.loop.backlog or (self.reporter and self.reporter.drain):
                timeout = 0
            else:       # idle: block until something happens or a report is due (no periodic work)
                due = next_keepalive if next_report is None else min(next_report, next_keepalive)
                if self.handover_until is not None:
                    due = min(due, self.handover_until)
                timeout = max(0, int((due - now) * 1000) + 1) if self.reporter else None
            ready = {fd for fd, _ in poller.poll(timeout)}
            changed = False
            if ring_fd is not None and ring_fd in ready:
                changed |= self.loop.on_event() > 0
            elif self.loop.backlog:
                changed |= self.loop.serve_pending() > 0
            if xs_fd in ready:
                if not self.xs.connected:     # xenstored or its gate went: a successor reconnects
                    raise ConnectionError("xenstore connection lost")
                paths = [p for p, _ in self.xs.events()]
                if paths:
                    self.driver.on_watch(paths)
                    changed = True
            if monitor_fd in ready and self.reporter.reconnected():
                next_keepalive = now      # a (new) supervisor listens: report now, it waits for that
            if self.reporter and (link_fd in ready or self.reporter.drain):
                changed |= self.reporter.on_message()
                if self.handover_until is not None:
                    next_keepalive = min(next_keepalive, time.monotonic() + HANDOVER_BEAT)
            if rfd in ready:
                os.read(rfd, 64)
            if changed and next_report is None:
                next_report = max(now, self.reporter.last_sent + REPORT_EVERY) if self.reporter else None
        # Graceful: answer the op in flight, leave xenbus state for a successor.
        self.loop.flush()
        if self.reporter:
            self.reporter.beat(final=True)
        reason = self.driver.exit_reason or ("orphaned" if self.orphaned else self.exit_note or "stopped by signal")
        logger.info("worker exiting: {}", reason)
        self.close()
        if self.driver.exit_reason is not None:
            return EXIT_DONE
        return EXIT_ORPHANED if self.orphaned else EXIT_STOPPED

    # --- supervisor commands (name -> method; see Reporter.on_message) ------
    def cmd_ack(self, args: dict):
        """The supervisor saw our beat (orphan detection); after a handover, a successor did."""
        self.last_ack = time.monotonic()
        if self.handover_until is not None:
            self.handover_until = None
            logger.info("a new supervisor took over")

    def cmd_handover(self, args: dict):
        """Our supervisor is leaving on SIGTERM without stopping us (a restart, or a stop):
        serve on for ``grace`` seconds (at most orphan_grace) for a successor to adopt us,
        then stop as on SIGTERM.  Its last word: every later ack is a successor's."""
        self.handover_until = time.monotonic() + handover_grace(args.get("grace"), self.cfg.orphan_grace)
        logger.info("supervisor left, handing over: serving on for {:.1f} s for a successor",
                    self.handover_until - time.monotonic())

    def cmd_permissive(self, args: dict):
        """Turn permissive mode on/off for one of our host devices (or all)."""
        return self.devices.set_permissive(args.get("bdf"), bool(args["on"]))

    def cmd_policy_reload(self, args: dict):
        """Apply the config-space policy again: its text as the supervisor read it (this
        worker's uid may not open the file), else the file read again."""
        text = args.get("text")
        return self.devices.reload_policy(text if isinstance(text, str) else None)

    def cmd_log_level(self, args: dict):
        logs.setup(str(args["level"]), domid=self.cfg.domid)
        return args["level"]

    COMMANDS = {"ack": cmd_ack, "handover": cmd_handover, "permissive": cmd_permissive, "policy-reload": cmd_policy_reload,
                "log-level": cmd_log_level}

    def _confine(self) -> None:
        """Become this guest's uid (when root) with no capabilities, then the seccomp filter:
        everything privileged is open by now (xenstore, the supervisor link, grant and
        event-channel handles); devices come later, lent by the device gate."""
        uid = self.cfg.uid if os.geteuid() == 0 else None
        if uid is None and self.cfg.uid is not None:
            logger.warning("not root: keeping uid {} instead of the worker uid {}", os.geteuid(), self.cfg.uid)
        privileges.drop(uid=uid, gid=uid)
        try:
            seccomp.install()
        except NotImplementedError as exc:
            logger.warning("no seccomp filter: {}", exc)

    def _on_term(self, signum, frame) -> None:
        self.stopping = True      # no logging in a signal handler

    def close(self) -> None:
        self.driver.close()
        if self.loop.ring:
            self.loop.ring.close()
            self.loop.ring = None
        # Guest gone (also when a SIGTERM raced our own watch event): reset the devices
        # and drop the saved state; stopped with the guest still there: keep it for a successor.
        try:
            gone = self.driver.exit_reason is not None or not self.xs.exists(self.cfg.backend_path)
        except OSError:
            gone = False
        if gone and self.msi and not self.orphaned:     # the broker unmaps before the reset
            self.msi.leave(tuple(self.devices.entries))
        self.devices.close(forget_state=gone)
        self.evtchn.close()
        try:
            pidfile(self.cfg).unlink(missing_ok=True)
        except PermissionError:
            pass           # confined: a stale pid file names a dead process, which adoption checks
        if self.reporter:
            self.reporter.close()
        self.xs.close()


def handover_grace(untrusted: object, orphan_grace: float) -> float:
    """The grace a handover command asks for, within [0, orphan_grace] (ValueError if not a number)."""
    if type(untrusted) not in (int, float) or untrusted != untrusted:
        raise ValueError("grace must be a number of seconds")
    return min(max(0.0, float(untrusted)), orphan_grace)


def pidfile_path(runtime_dir, domid: int) -> Path:
    """``<runtime>/workers/dom<N>.pid``: written by the worker, read by a supervisor adopting it."""
    return Path(runtime_dir) / "workers" / f"dom{domid}.pid"


def pidfile(cfg: WorkerConfig) -> Path:
    """This worker's pid file."""
    return pidfile_path(runtime_dir_for(cfg), cfg.domid)


def write_pidfile(cfg: WorkerConfig) -> None:
    """The pid file (pid, start time, token): lets a new supervisor adopt this
    worker and authenticate its beats."""
    path = pidfile(cfg)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, f"{os.getpid()} {psutil.Process().create_time()} {cfg.token}\n".encode())


def run_worker(cfg: WorkerConfig) -> None:
    """Process entry point (target of the spawner)."""
    logs.setup(cfg.log_level, domid=cfg.domid)
    write_pidfile(cfg)          # first: a supervisor restarted now must find us
    try:
        confine_paths(cfg)      # before any thread starts: Landlock binds threads made later,
        privileges.limit_bounding()     # as do the bounding set and no_new_privs
        worker = Worker(cfg)
    except Exception:
        logger.exception("worker boot failed")
        os._exit(EXIT_BOOT_FAILED)
    proctitle.set_title(proctitle.worker_title(cfg.domid, worker.xs.read(f"/local/domain/{cfg.domid}/name")))
    try:
        code = worker.run()
    except StuckOp as exc:
        logger.error("op stuck: {}; exiting so that a successor serves it", exc)
        os._exit(EXIT_STUCK)
    except Exception:
        logger.exception("worker crashed")
        os._exit(EXIT_CRASHED)
    os._exit(code)
