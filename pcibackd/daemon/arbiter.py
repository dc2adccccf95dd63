"""The supervisor: one loop that watches xenstore and keeps one worker per guest.

Wake sources, all polled in one place: the xenstore watch on
``/local/domain/0/backend/pci``, worker exit sentinels, worker heartbeats
(ZeroMQ ROUTER), ``pcibackctl`` requests (ZeroMQ ROUTER) and a signal pipe.
Signal handlers only enqueue; all work happens in :meth:`Supervisor.run`.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

from pcibackd import __version__
from pcibackd.common.ratelimit import worth_logging
from pcibackd.worker.main import EXIT_DONE, EXIT_ORPHANED, EXIT_STOPPED, WorkerConfig, pidfile_path, run_worker
from pcibackd.daemon import systemd
from pcibackd.daemon.config import DaemonConfig
from pcibackd.daemon.spawner import Spawner
from pcibackd.daemon.states import RestartPolicy, WorkerState
from pcibackd.platform.select import choose_platform, platform_module

BACKEND_ROOT = "/local/domain/0/backend/pci"


@dataclass
class Guest:
    """The supervisor's record of one frontend and its worker."""

    domid: int
    backend_path: str
    state: WorkerState = WorkerState.STARTING
    proc: object = None              # our child (from the spawner), or None
    pid: int | None = None
    sentinel: int | None = None      # readable when the worker exits (proc.sentinel or a pidfd)
    pidfd: int | None = None         # signals go through this, never a bare (reusable) pid
    adopted: bool = False            # left running by a previous supervisor
    token: str = ""                  # the worker proves its beats with this
    stop_deadline: float = 0.0
    terminated: bool = False         # SIGTERM already sent while STOPPING
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0
    last_beat: float = 0.0
    beat: dict = field(default_factory=dict)
    last_exit: str = ""


class Supervisor:
    """Owns the guests table; see the module docstring for the loop."""

    def __init__(self, cfg: DaemonConfig, policy: RestartPolicy | None = None):
        self.cfg = cfg
        self.policy = policy or RestartPolicy(max_failures=cfg.restart_max_failures,
                                              stable_after=cfg.restart_stable_after)
        self.guests: dict[int, Guest] = {}
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
        from pcibackd.xenstore.client import XenStore
        from pcibackd.control.server import ControlServer
        self.spawner.start()            # before any thread exists
        self.runtime.mkdir(parents=True, exist_ok=True)
        os.chmod(self.runtime, 0o700)
        self.xs = XenStore(self.cfg.xenstored_path)
        self.zctx = zmq.Context()
        self.workers_sock = self.zctx.socket(zmq.ROUTER)
        self.workers_sock.setsockopt(zmq.LINGER, 0)
        self.workers_sock.setsockopt(zmq.RCVHWM, 256)
        self.workers_sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        self.workers_endpoint = f"ipc://{self.runtime / 'workers.sock'}"
        self.workers_sock.bind(self.workers_endpoint)
        self.control = ControlServer(self.zctx, self.runtime / "control.sock", self)
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.xs.watch(BACKEND_ROOT, "backends")

    def _on_signal(self, signum, frame) -> None:
        self.signals.put_nowait(signum)     # no logging here

    # ------------------------------------------------------------- loop --
    def run(self) -> int:
        self._setup()
        self.scan()
        systemd.notify(f"READY=1\nSTATUS=serving {len(self.guests)} guest(s)")
        logger.info("pcibackd {} ready: platform {}, topology {}, runtime {}", __version__,
                    self.cfg.platform, self.cfg.topology, self.runtime)
        poller = zmq.Poller()
        poller.register(self.workers_sock, zmq.POLLIN)
        poller.register(self.control.sock, zmq.POLLIN)
        poller.register(self.xs.fileno(), zmq.POLLIN)
        poller.register(self.sig_r, zmq.POLLIN)
        watchdog = systemd.watchdog_interval()
        next_dog = 0.0
        while not self.stopping:
            sentinels = {g.sentinel: g for g in self.guests.values() if g.sentinel is not None}
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
        due = [g.restart_at - now for g in self.guests.values() if g.state == WorkerState.BACKOFF]
        control = self.control.next_deadline()
        if control is not None:
            due.append(control - now)
        # wake when a heartbeat deadline passes: a hung worker's pending op is waiting
        due += [g.last_beat + self._silence_allowed(g) - now for g in self.guests.values()
                if g.sentinel is not None and g.state in (WorkerState.RUNNING, WorkerState.STARTING)]
        return max(0.0, min([0.5, *due]))

    def _silence_allowed(self, guest: Guest) -> float:
        """heartbeat_timeout once a worker has beaten; before its first beat, its boot
        gets boot_timeout: killing a slow starter only starts another as slow."""
        if guest.state == WorkerState.STARTING:
            return max(self.cfg.heartbeat_timeout, self.cfg.boot_timeout)
        return self.cfg.heartbeat_timeout

    def _drain_signals(self) -> None:
        try:
            while os.read(self.sig_r, 64):
                pass
        except BlockingIOError:
            pass
        while not self.signals.empty():
            signum = self.signals.get_nowait()
            handler = SIGNAL_HANDLERS.get(signum)
            if handler:
                handler(self)

    def handle_term(self) -> None:
        """SIGTERM/SIGINT: graceful stop; workers finish the op in flight."""
        logger.info("stopping (signal)")
        self.stopping = True

    def handle_hup(self) -> None:
        """SIGHUP: rescan xenstore (policy reload comes with confspace)."""
        self.scan()

    def handle_chld(self) -> None:
        """SIGCHLD: nothing; exit sentinels are polled."""

    # ----------------------------------------------------------- guests --
    def scan(self) -> None:
        """Start workers for new backend directories, forget removed ones."""
        present = {}
        for untrusted_domid in self.xs.ls(BACKEND_ROOT):
            if not untrusted_domid.isdigit() or len(untrusted_domid) > 5:
                if untrusted_domid not in self.ignored_names:       # once per name, not per event
                    self.ignored_names.add(untrusted_domid)
                    logger.warning("ignoring {}/{!r}: not a domid", BACKEND_ROOT, untrusted_domid[:20])
                continue
            domid = int(untrusted_domid)
            if domid == 0 or domid >= 0x7FF0:
                continue
            path = f"{BACKEND_ROOT}/{domid}/0"
            if self.xs.read(f"{path}/frontend") is not None:
                present[domid] = path
        for domid, path in present.items():
            known = self.guests.get(domid)
            if (known is not None and known.state == WorkerState.EXITED and known.sentinel is None
                    and self.xs.read(f"{path}/state") in (None, "1")):
                del self.guests[domid]       # a new backend in the same place: serve it afresh
            if domid not in self.guests:
                self.guests[domid] = guest = Guest(domid, path)
                if not self._adopt(guest):
                    logger.info("new PCI backend for domain {}", domid)
                    self._start(guest)
        for domid in list(self.guests):
            if domid not in present:
                guest = self.guests[domid]
                if guest.sentinel is None:
                    del self.guests[domid]
                    logger.info("domain {} forgotten", domid)
                elif guest.state != WorkerState.STOPPING:
                    # The worker watches the same directory and finishes by itself
                    # (resetting its devices); SIGTERM only if it has not within stop_timeout.
                    guest.state, guest.terminated = WorkerState.STOPPING, False
                    guest.stop_deadline = time.monotonic() + self.cfg.stop_timeout

    def _worker_config(self, guest: Guest) -> WorkerConfig:
        c = self.cfg
        return WorkerConfig(domid=guest.domid, backend_path=guest.backend_path, platform=c.platform,
                            xenstored_path=c.xenstored_path, topology=c.topology,
                            poll_window_us=c.poll_window_us, supervisor_endpoint=self.workers_endpoint,
                            heartbeat_interval=c.heartbeat_interval, policy_path=c.policy_path,
                            log_level=c.log_level, state_dir=str(self.runtime), orphan_grace=c.orphan_grace)

    def _adopt(self, guest: Guest) -> bool:
        """Take over a live worker a previous supervisor left (pid file + pidfd)."""
        pidfile = pidfile_path(self.runtime, guest.domid)
        try:
            pid_text, started_text, token = pidfile.read_text().split()
            pid, started = int(pid_text), float(started_text)
            fd = os.pidfd_open(pid)
        except (OSError, ValueError):
            return False
        import psutil
        try:
            same = abs(psutil.Process(pid).create_time() - started) < 0.01
        except psutil.Error:
            same = False
        if not same:
            os.close(fd)       # a stale pid file, the pid reused by another process
            return False
        guest.pid, guest.sentinel, guest.pidfd, guest.adopted, guest.token = pid, fd, fd, True, token
        guest.state = WorkerState.STARTING
        guest.started_at = guest.last_beat = time.monotonic()
        logger.info("adopted the running worker of domain {} (pid {})", guest.domid, pid)
        return True

    def _start(self, guest: Guest) -> None:
        guest.token = secrets.token_hex(16)
        cfg = self._worker_config(guest)
        cfg.token = guest.token
        try:
            guest.proc = self.spawner.spawn(run_worker, cfg, name=f"pcibackd-dom{guest.domid}")
        except Exception as exc:       # e.g. the fork server died (EOFError): a failed start, not our crash
            logger.error("cannot start a worker for domain {}: {!r}", guest.domid, exc)
            self.spawner.restart()
            guest.proc = guest.sentinel = guest.pidfd = None
            guest.failures += 1
            guest.state = self.policy.next_state(guest.failures)
            guest.restart_at = time.monotonic() + max(0.1, self.policy.delay(guest.failures))
            return
        guest.pid, guest.sentinel, guest.adopted = guest.proc.pid, guest.proc.sentinel, False
        try:
            guest.pidfd = os.pidfd_open(guest.pid)
        except OSError:
            guest.pidfd = None          # already gone: the sentinel reports it
        guest.state = WorkerState.STARTING
        guest.started_at = guest.last_beat = time.monotonic()
        logger.info("worker for domain {} started: pid {}", guest.domid, guest.pid)

    def _stop(self, guest: Guest) -> None:
        guest.state, guest.terminated = WorkerState.STOPPING, True
        guest.stop_deadline = time.monotonic() + self.cfg.stop_timeout
        self._signal(guest, signal.SIGTERM)

    def _signal(self, guest: Guest, sig: int) -> None:
        """Signal the worker through its pidfd: never a recycled pid."""
        if guest.pidfd is None:
            return
        try:
            signal.pidfd_send_signal(guest.pidfd, sig)
        except ProcessLookupError:
            pass

    def _reap(self, guest: Guest) -> None:
        if guest.proc is not None:
            guest.proc.join(0)
            code = guest.proc.exitcode
        else:
            code = 0 if guest.beat.get("final") and guest.beat.get("pid") == guest.pid else None
        if guest.pidfd is not None:
            os.close(guest.pidfd)         # (for adopted workers this is also the sentinel)
        guest.proc = guest.sentinel = guest.pidfd = None
        ran = time.monotonic() - guest.started_at
        guest.last_exit = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                           else f"exit {code}" if code is not None else "exited (adopted; status unknown)")
        if code in (EXIT_STOPPED, EXIT_ORPHANED) and guest.state != WorkerState.STOPPING:
            # Stopped from outside, or orphaned while we stalled: the guest still
            # needs service; restart now, without counting a failure.
            guest.state, guest.restart_at = WorkerState.BACKOFF, time.monotonic()
            logger.warning("worker for domain {} left ({}); replacing it", guest.domid, guest.last_exit)
            return
        if guest.state == WorkerState.STOPPING or code == EXIT_DONE:
            guest.state = WorkerState.EXITED
            logger.info("worker for domain {} finished ({})", guest.domid, guest.last_exit)
            self._forget_dead_domain(guest)
            if self.xs.read(f"{guest.backend_path}/frontend") is None:
                del self.guests[guest.domid]
            return
        guest.failures = 1 if ran >= self.policy.stable_after else guest.failures + 1
        guest.state = self.policy.next_state(guest.failures)
        if guest.state == WorkerState.FATAL:
            logger.error("worker for domain {} failed {} times in a row ({}): FATAL, not restarting",
                         guest.domid, guest.failures, guest.last_exit)
            return
        guest.restart_at = time.monotonic() + self.policy.delay(guest.failures)
        logger.warning("worker for domain {} died ({}); restart #{} in {:.2f} s", guest.domid,
                       guest.last_exit, guest.restarts + 1, guest.restart_at - time.monotonic())

    def _forget_dead_domain(self, guest: Guest) -> None:
        """The guest's domain is gone (xl destroy of a guest whose devices our
        toolstack attached: libxl does not know them): remove its backend nodes."""
        if self.xs.exists(f"/local/domain/{guest.domid}"):
            return
        self.xs.rm(f"{BACKEND_ROOT}/{guest.domid}")
        # The error node (if any) stays: it tells the administrator what happened.
        logger.info("domain {} is gone: its PCI backend nodes were removed", guest.domid)

    def _manage(self) -> None:
        self._on_worker_messages()      # judge heartbeats on fresh data, not a stalled iteration's
        now = time.monotonic()
        for guest in list(self.guests.values()):
            if guest.state == WorkerState.STOPPING and guest.sentinel is not None and now > guest.stop_deadline:
                if not guest.terminated:
                    logger.warning("worker for domain {} did not finish after its backend went: SIGTERM",
                                   guest.domid)
                    self._stop(guest)
                else:
                    logger.error("worker for domain {} ignored SIGTERM for {:.0f} s: killing", guest.domid,
                                 self.cfg.stop_timeout)
                    self._signal(guest, signal.SIGKILL)
                    guest.stop_deadline = now + self.cfg.stop_timeout
            elif guest.state == WorkerState.BACKOFF and now >= guest.restart_at:
                guest.restarts += 1
                self._start(guest)
            elif (guest.state in (WorkerState.RUNNING, WorkerState.STARTING) and guest.sentinel is not None
                  and now - guest.last_beat > self._silence_allowed(guest)):
                logger.error("worker for domain {} (pid {}) missed heartbeats for {:.1f} s: killing",
                             guest.domid, guest.pid, now - guest.last_beat)
                self._signal(guest, signal.SIGKILL)
                guest.last_beat = now   # once per timeout; the sentinel reports the death

    def restart_worker(self, domid: int) -> bool:
        """Replace a guest's worker (pcibackctl restart); FATAL guests get a fresh start."""
        guest = self.guests.get(domid)
        if guest is None:
            return False
        guest.failures = 0
        if guest.sentinel is not None:
            self._signal(guest, signal.SIGKILL)   # the reap path restarts it immediately
        else:
            guest.state, guest.restart_at = WorkerState.BACKOFF, 0.0
        return True

    def _on_worker_messages(self) -> None:
        for _ in range(256):     # bounded: a flooding worker cannot starve the loop
            try:
                ident, raw = self.workers_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = json.loads(raw, parse_constant=_reject_constant)
                domid = msg["domid"]
                if not isinstance(msg, dict) or type(domid) is not int:
                    raise ValueError("not a worker message")
            except Exception:       # anything a peer sends must not reach the loop
                self.malformed += 1
                if worth_logging(self.malformed):
                    logger.warning("malformed message on the worker socket from {!r} ({} so far)",
                                   ident[:16], self.malformed)
                continue
            guest = self.guests.get(domid)
            if (guest is None or msg.get("pid") != guest.pid or ident != f"dom{domid}".encode()
                    or not guest.token or msg.get("token") != guest.token):
                continue
            guest.last_beat = time.monotonic()
            if msg.get("type") == "reply":
                self.control.worker_reply(domid, msg)
                continue
            guest.beat = msg
            if guest.state == WorkerState.STARTING:
                guest.state = WorkerState.RUNNING
            self.send_worker(domid, "ack")

    def send_worker(self, domid: int, cmd: str, args: dict | None = None, req_id: str | None = None) -> bool:
        """Queue a command for a worker (never blocks; False when it cannot be sent)."""
        msg = {"cmd": cmd, "args": args or {}, "id": req_id}
        try:
            self.workers_sock.send_multipart([f"dom{domid}".encode(), json.dumps(msg).encode()], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def set_log_level(self, level: str) -> None:
        from pcibackd.common import logs
        logs.setup(level)
        self.cfg.log_level = level

    def devices(self) -> list[dict]:
        """Assignable host functions (the platform's: on Xen those bound to a stub driver)."""
        held = {d["bdf"]: g["domid"] for g in self.status()["guests"] for d in g["devices"]}
        return [{"bdf": str(b), "held_by": held.get(str(b))} for b in self.platform.assignable()]

    # ---------------------------------------------------------- shutdown --
    def _shutdown(self) -> int:
        systemd.notify("STOPPING=1")
        live = [g for g in self.guests.values() if g.sentinel is not None]
        for g in live:
            self._stop(g)
        deadline = time.monotonic() + self.cfg.stop_timeout
        for g in live:
            if not select.select([g.sentinel], [], [], max(0.0, deadline - time.monotonic()))[0]:
                logger.warning("worker for domain {} did not stop in time: killing", g.domid)
                self._signal(g, signal.SIGKILL)
                select.select([g.sentinel], [], [], 1.0)
            if g.proc is not None:
                g.proc.join(0)
        self.control.close()
        self.workers_sock.close(0)
        self.zctx.term()
        self.xs.close()
        logger.info("stopped")
        return 0

    # ----------------------------------------------------------- status --
    def status(self) -> dict:
        """The daemon and every guest, for pcibackctl status (no per-process
        probing here: control/procstats adds memory and CPU figures)."""
        guests = []
        for g in sorted(self.guests.values(), key=lambda g: g.domid):
            beat = g.beat
            alive = g.sentinel is not None
            guests.append({
                "domid": g.domid, "worker_state": g.state.value, "pid": g.pid if alive else None,
                "adopted": g.adopted, "restarts": g.restarts, "last_exit": g.last_exit,
                "xenbus_state": beat.get("xenbus_state"), "connected": beat.get("connected", False),
                "served": beat.get("served", {}), "errors": beat.get("errors", {}),
                "latency_us": beat.get("latency_us"), "devices": beat.get("devices", []),
                "heartbeat_age": round(time.monotonic() - g.last_beat, 3) if alive else None,
            })
        return {"daemon": {"version": __version__, "pid": os.getpid(),
                           "uptime": round(time.time() - self.started, 1),
                           "platform": self.platform.name, "topology": self.cfg.topology,
                           "xenstore": self.cfg.xenstored_path or os.environ.get("XENSTORED_PATH", "default"),
                           "xenstore_connected": self.xs.connected},
                "guests": guests}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


SIGNAL_HANDLERS = {
    signal.SIGTERM: Supervisor.handle_term,
    signal.SIGINT: Supervisor.handle_term,
    signal.SIGHUP: Supervisor.handle_hup,
    signal.SIGCHLD: Supervisor.handle_chld,
}
