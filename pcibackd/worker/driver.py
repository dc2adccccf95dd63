"""The thin xenstore shell around :class:`~.xenbus.BackendMachine`.

Driver: does the I/O of the xenbus half.  Turns watch events into machine
inputs (reading the backend and frontend directories whole) and carries out
the machine's effects: state and node writes inside transactions (retried on
EAGAIN by the XenStore wrapper), device export through the worker's
callbacks, ring map/unmap, fatal errors.  The machine's state moves only
through :meth:`~.xenbus.BackendMachine.handle`.

Echoes: xenstore sends a watcher one event per node written (and one when a
watch is registered), its own writes included.  An event the driver expects
(its own write's, the registration's) tells it nothing new, so it is consumed
without reading both directories again; any other event in a batch still
brings a full re-read, which sees everything written before it.  Expected
echoes are forgotten at each full re-read: one that never came costs at most
one extra re-read, never a missed change.
"""

from __future__ import annotations

import errno as errno_mod
from collections import Counter
from typing import Callable

from loguru import logger

from pcibackd.wire.paths import error_path, frontend_path
from pcibackd.wire.pciif import XenbusState as S
from pcibackd.worker import xenbus as xb
from pcibackd.worker.xenbus_nodes import (
    FRONTEND_KEYS, MAX_DEVS, BackendNodes, FrontendNodes, backend_key_used, parse_backend, parse_frontend,
)


class Driver:
    """Runs one guest's backend machine against xenstore.

    ``actions`` supplies the effects that are not xenstore writes:
    ``export(placement, opts)``, ``remove(hosts)``, ``map_ring(gref, port)``
    and ``unmap_ring()``; each raises OSError on failure.
    """

    def __init__(self, xs, domid: int, backend_path: str, machine: xb.BackendMachine, actions):
        self.xs, self.domid, self.be = xs, domid, backend_path
        self.machine, self.actions = machine, actions
        self.fe: str | None = None
        self.exit_reason: str | None = None
        self.ignored = 0
        self._token = f"be-{domid}"
        self._echoes: Counter[str] = Counter()     # event paths our own requests will bring
        self._fe_values: dict[str, str | None] | None = None     # the frontend keys as last read
        self._run: dict[type, Callable] = {
            xb.SwitchState: self._switch_state,
            xb.ExportDevices: lambda e: actions.export(e.placement, dict(e.opts), e.resume),
            xb.RemoveDevices: lambda e: actions.remove(e.hosts),
            xb.Publish: self._publish,
            xb.MapRing: lambda e: actions.map_ring(e.gref, e.port),
            xb.UnmapRing: lambda e: actions.unmap_ring(),
            xb.Fatal: self._fatal,
            xb.Exit: self._exit,
        }

    # ----------------------------------------------------------- inputs --
    def start(self) -> None:
        """Watch both directories and feed the first Probe."""
        untrusted_fe = self.xs.read(f"{self.be}/frontend")
        # The frontend path is toolstack-written (dom0-owned node) but still
        # checked: it must be this guest's device directory.
        self.fe = untrusted_fe if untrusted_fe == frontend_path(self.domid) else None
        self._watch(self.be)
        if self.fe is None:
            self.feed(xb.BadFrontendPath(f"bad frontend path {str(untrusted_fe)[:80]!r}"))
            return
        self._watch(self.fe)
        # The registrations' own events come after these reads: they are echoes.
        self.feed(xb.Probe(self.read_backend(), self.read_frontend()))

    def _watch(self, path: str) -> None:
        self.xs.watch(path, self._token)
        self._echoes[path] += 1          # xenstore fires every new watch once at once

    def on_watch(self, paths: list[str]) -> None:
        """Re-read what changed and feed the machine (our own echoes aside)."""
        news = [p for p in paths if not self._consume_echo(p)]
        be_hit = any(p == self.be or p.startswith(self.be + "/") for p in news)
        fe_hit = self.fe is not None and any(p == self.fe or p.startswith(self.fe + "/") for p in news)
        if be_hit or fe_hit:
            self._echoes.clear()         # the re-read below sees every write made so far
        if be_hit:
            names = self.xs.ls(self.be)
            if not names:          # no frontend node, no anything: the toolstack removed it
                self.feed(xb.BackendGone())
                return
            self.feed(xb.BackendChanged(self.read_backend(names)))
        if fe_hit and self.exit_reason is None:
            self.feed(xb.FrontendChanged(self.read_frontend(news)))

    def _consume_echo(self, path: str) -> bool:
        if self._echoes[path] > 0:
            self._echoes[path] -= 1
            return True
        return False

    def read_backend(self, names: list[str] | None = None) -> BackendNodes:
        """The backend directory: the nodes the machine uses, each read once (``names``: its listing)."""
        untrusted = {k: v for k in (self.xs.ls(self.be) if names is None else names)
                     if backend_key_used(k) and (v := self.xs.read(f"{self.be}/{k}")) is not None}
        nodes = parse_backend(untrusted)
        for problem in nodes.problems:
            logger.warning("backend {}: {}", self.be, problem)
        return nodes

    def read_frontend(self, changed: list[str] | None = None) -> FrontendNodes:
        """The frontend's :data:`FRONTEND_KEYS`; with ``changed`` (event paths) only the keys
        they name are read again, the rest kept from the last read (no event: no change)."""
        if self.fe is None:
            return FrontendNodes(False)
        prefix = self.fe + "/"
        keys = FRONTEND_KEYS
        if changed is not None and self._fe_values is not None and self.fe not in changed:
            named = {p[len(prefix):] for p in changed if p.startswith(prefix)}
            keys = tuple(k for k in FRONTEND_KEYS if k in named)
        else:
            self._fe_values = {}
        for k in keys:
            self._fe_values[k] = self.xs.read(prefix + k)
        untrusted = self._fe_values
        exists = untrusted["state"] is not None or bool(self.xs.ls(self.fe))
        return parse_frontend(untrusted, exists)

    def feed(self, event, depth: int = 0) -> None:
        """One input through the machine, then its effects in order."""
        try:
            effects = self.machine.handle(event)
        except xb.ProtocolError as exc:
            self.ignored += 1
            logger.info("xenbus input ignored: {}", exc)
            return
        for effect in effects:
            try:
                self._run[type(effect)](effect)
            except OSError as exc:
                logger.error("{} failed: {}", type(effect).__name__, exc)
                if depth >= 2:
                    # Even reporting the failure fails (xenstore unusable): crash, and
                    # let the supervisor restart us with backoff.
                    raise RuntimeError(f"cannot report xenbus failure: {exc}") from exc
                self.feed(xb.EffectFailed(effect, exc.errno or errno_mod.EIO, f"{type(effect).__name__}: {exc}"),
                          depth + 1)
                return

    # ---------------------------------------------------------- effects --
    def _switch_state(self, e: xb.SwitchState) -> None:
        path = f"{self.be}/state"

        def tx(t):
            # Like xenbus_switch_state: never recreate a vanished node.
            if t.read(path) is None:
                return []
            t.write(path, str(int(e.state)))
            return [path]
        self._echoes.update(self.xs.run_transaction(tx))
        logger.info("backend state -> {}", S(e.state).name)

    def _publish(self, e: xb.Publish) -> None:
        def tx(t):
            written: list[str] = []
            if t.read(f"{self.be}/state") is None:
                return written

            def write(key: str, value: str) -> None:
                t.write(f"{self.be}/{key}", value)
                written.append(f"{self.be}/{key}")
            for index, vdev in e.vdevs:
                write(f"vdev-{index}", vdev)
                write(f"state-{index}", str(int(S.Initialised)))
            old = t.read(f"{self.be}/root_num")
            for k, root in enumerate(e.roots):
                write(f"root-{k}", root)
            if old is not None and old.isdigit():
                for k in range(len(e.roots), min(int(old), MAX_DEVS)):
                    t.rm(f"{self.be}/root-{k}")     # its event (if it existed) is news: a re-read
            write("root_num", str(len(e.roots)))
            return written
        self._echoes.update(self.xs.run_transaction(tx))

    def _fatal(self, e: xb.Fatal) -> None:
        logger.error("fatal: {} ({})", e.message, e.err)
        self.xs.write(error_path(self.domid), f"{e.err} {e.message}")
        self._switch_state(xb.SwitchState(S.Closing))

    def _exit(self, e: xb.Exit) -> None:
        logger.info("worker done: {}", e.reason)
        self.exit_reason = e.reason

    def close(self) -> None:
        try:
            self.xs.unwatch(self.be, self._token)
            if self.fe:
                self.xs.unwatch(self.fe, self._token)
        except OSError:
            pass
