"""A simulated dom0: private oxenstored + simulated platform and PCI host +
the pcibackd daemon, plus a toolstack and simulated guests to drive it.

One harness for the demo, the tests and the benchmarks.  Everything lives in
one private directory (under /dev/shm when available) and everything it
started is stopped and removed by :meth:`SimDom0.stop`, also on errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcibackd.control.client import DaemonUnreachable, call
from pcibackd.wire.bdf import BDF
from pcibackd.xenstore.client import XenStore
from pcibackd.xenstore.toolstack import Toolstack
from simdom0.hostpci import SimHost
from simdom0.pcifront import PCIFront
from simdom0.platform import BOOT_OPTIONS, SimPlatform
from simdom0.xenstored import Xenstored


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) \
        else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _base_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class SimDom0:
    """Start with :meth:`start`; use as a context manager."""

    def __init__(self, topology: str = "vpci", log_level: str = "INFO", poll_window_us: float = 50.0,
                 daemon_log: Path | None = None, extra_args: list[str] | None = None,
                 config: dict | None = None, env: dict | None = None,
                 extra_guest_irqs: int | None = None):
        """``extra_guest_irqs``: the simulated Xen's per-guest PIRQ pool (Xen's boot option)."""
        self.topology, self.log_level, self.poll_window_us = topology, log_level, poll_window_us
        self.extra_args = extra_args or []
        self.config, self.extra_env = config or {}, env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="pcibackd-sim-", dir=_base_dir()))
        os.chmod(self.dir, 0o711)       # workers (a uid each) reach the simulated platform beneath it
        self.sim_dir = self.dir / "sim"
        self.sim_dir.mkdir()
        if extra_guest_irqs is not None:
            (self.sim_dir / "xen").mkdir()
            (self.sim_dir / "xen" / BOOT_OPTIONS).write_text(json.dumps({"extra_guest_irqs": extra_guest_irqs}))
        self.runtime = self.sim_dir / "run"
        self.daemon_log = daemon_log or (self.dir / "daemon.log")
        self.xenstored = None
        self.daemon: subprocess.Popen | None = None
        self.xs = None
        self.host = None
        self.fronts: list[PCIFront] = []

    # ------------------------------------------------------------- start --
    def start(self, daemon: bool = True) -> "SimDom0":
        try:
            self.xenstored = Xenstored.start(self.dir / "xenstored")
            self.xs = XenStore(self.xenstored.socket_path)
            self.toolstack = Toolstack(self.xs)
            self.host = SimHost(self.sim_dir / "pci")
            if daemon:
                self.start_daemon()
        except BaseException:
            self.stop()
            raise
        return self

    def daemon_argv(self) -> list[str]:
        conf = []
        if self.config:
            path = self.dir / "pcibackd.toml"
            path.write_text("[pcibackd]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in self.config.items()))
            conf = ["--config", str(path)]
        return [sys.executable, "-m", "pcibackd", "run", "--platform", f"sim:{self.sim_dir}",
                "--xenstored-path", self.xenstored.socket_path, "--runtime-dir", str(self.runtime),
                "--state-dir", str(self.sim_dir / "state"),
                "--topology", self.topology, "--log-level", self.log_level,
                "--poll-window-us", str(self.poll_window_us), *conf, *self.extra_args]

    def start_daemon(self, timeout: float = 15.0) -> None:
        """Start ``pcibackd run`` and wait until its control socket answers."""
        with open(self.daemon_log, "ab") as log:
            self.daemon = subprocess.Popen(self.daemon_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=self._env())
        deadline = time.monotonic() + timeout
        while True:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"pcibackd exited with {self.daemon.returncode}:\n{self.log_tail()}")
            try:
                call(self.runtime, "status", timeout=0.5)
                return
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pcibackd did not come up in {timeout} s:\n{self.log_tail()}")
                time.sleep(0.05)     # polling a condition with a deadline

    def _env(self) -> dict:
        return dict(os.environ, XENSTORED_PATH=self.xenstored.socket_path, PYTHONUNBUFFERED="1", **self.extra_env)

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.daemon is None:
            return None
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            try:
                self.daemon.wait(timeout)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(5)
        code, self.daemon = self.daemon.returncode, None
        return code

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------ guests --
    def add_device(self, dump: str, bdf: str | BDF):
        return self.host.add(dump, BDF.parse(str(bdf)))

    def create_guest(self, domid: int, devices: list[str | BDF], name: str | None = None,
                     opts: str | None = None) -> None:
        """Toolstack: domain nodes and the PCI backend/frontend for ``devices``."""
        self.toolstack.create_domain(domid, name or f"guest{domid}")
        extra = {"opts": opts} if opts is not None else {}
        self.toolstack.attach(domid, [BDF.parse(str(d)) for d in devices], starting=True, **extra)

    def frontend(self, domid: int, spin: bool = False):
        """A connected-ready PCIFront acting as guest ``domid`` (in this process)."""
        xs = XenStore(self.xenstored.socket_path)
        front = PCIFront(xs, SimPlatform(self.sim_dir, domid), domid, spin=spin)
        self.fronts.append(front)
        return front

    def status(self, timeout: float = 5.0) -> dict:
        rep = call(self.runtime, "status", timeout=timeout)
        if rep["status"] != "ok":
            raise RuntimeError(rep["reason"])
        return rep["result"]

    def guest_status(self, domid: int) -> dict | None:
        return next((g for g in self.status()["guests"] if g["domid"] == domid), None)

    # -------------------------------------------------------------- stop --
    def stop(self) -> None:
        for front in self.fronts:
            try:
                front.close()
                front.xs.close()
            except Exception:
                pass
        self.fronts.clear()
        self.stop_daemon(signal.SIGINT)      # workers stop with it (SIGTERM would hand them over)
        if self.xs is not None:
            self.xs.close()
            self.xs = None
        if self.xenstored is not None:
            self.xenstored.stop()
            self.xenstored = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SimDom0":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
