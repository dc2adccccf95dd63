"""The backend half of xenbus for one PCI frontend, as a state machine.

Pure: no xenstore, no I/O.  :class:`BackendMachine` takes typed inputs (parsed
snapshots of the backend and frontend directories, see
:mod:`~pcibackd.worker.xenbus_nodes`, and the failures of effects) and returns
typed effects, which :mod:`pcibackd.worker.driver` carries out in order (the
first effect that fails aborts the rest and comes back as :class:`EffectFailed`).
Its state changes only inside :meth:`BackendMachine.handle`.

The state is our own ``state`` node (XenbusState).  The toolstack writes that
node too (``7`` to hot-plug, ``5`` with ``online=0`` to tear down), so a
backend snapshot can move the machine (see :data:`TOOLSTACK_MOVES`).

Transition table (state x input -> handler); a pair that is not in the table
raises :class:`ProtocolError` and leaves the state unchanged:

{table}
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Callable

from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import XEN_PCI_MAGIC, XenbusState as S
from pcibackd.worker import topology
from pcibackd.worker.xenbus_nodes import BackendNodes, DevEntry, FrontendNodes, parse_uint


class ProtocolError(RuntimeError):
    """An input that is not legal in the current state (state unchanged)."""


# ---------------------------------------------------------------- inputs ----

@dataclass(frozen=True)
class Probe:
    """First look at both directories when the worker starts (or restarts)."""

    backend: BackendNodes
    frontend: FrontendNodes


@dataclass(frozen=True)
class BackendChanged:
    backend: BackendNodes


@dataclass(frozen=True)
class FrontendChanged:
    frontend: FrontendNodes


@dataclass(frozen=True)
class BadFrontendPath:
    """The backend's ``frontend`` node does not name this guest's device directory."""

    message: str


@dataclass(frozen=True)
class BackendGone:
    """The backend directory was removed (toolstack cleanup)."""


@dataclass(frozen=True)
class EffectFailed:
    effect: object
    err: int
    reason: str


# --------------------------------------------------------------- effects ----

@dataclass(frozen=True)
class SwitchState:
    state: int


@dataclass(frozen=True)
class ExportDevices:
    """Open and seize these host functions and serve them at these addresses."""

    placement: tuple[tuple[BDF, BDF], ...]
    opts: tuple[tuple[BDF, tuple[tuple[str, str], ...]], ...] = ()
    resume: bool = False     # a restarted worker: continue from the saved emulated state


@dataclass(frozen=True)
class RemoveDevices:
    hosts: tuple[BDF, ...]


@dataclass(frozen=True)
class Publish:
    """One transaction: ``vdev-N``, ``state-N=3`` and the roots."""

    vdevs: tuple[tuple[int, str], ...]
    roots: tuple[str, ...]


@dataclass(frozen=True)
class MapRing:
    gref: int
    port: int


@dataclass(frozen=True)
class UnmapRing:
    """Flush the op in flight, unbind the channel, unmap the page."""


@dataclass(frozen=True)
class Fatal:
    """xenbus_dev_fatal: ``error`` node ``"<errno> <message>"`` and Closing."""

    err: int
    message: str


@dataclass(frozen=True)
class Exit:
    reason: str


# --------------------------------------------------------------- machine ----

@dataclass
class BackendMachine:
    """State of one backend device directory (devid 0 of one guest)."""

    mode: str = "vpci"
    state: int = S.Initialising
    exported: dict[BDF, BDF] = field(default_factory=dict)    # host -> guest
    ring: bool = False
    backend: BackendNodes = BackendNodes(None, True)
    frontend: FrontendNodes = FrontendNodes(False)
    # VF or not, bridges above: asked of the host when placing (default: a plain function)
    host_facts: Callable[[BDF], topology.HostFacts] = field(
        default=lambda _host: topology.PLAIN, repr=False, compare=False)

    def handle(self, event) -> list:
        """Feed one input; returns effects.  Raises ProtocolError (state kept)."""
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise ProtocolError(f"{type(event).__name__} is not legal in state {S(self.state).name}")
        return handler(self, event)

    # -- helpers ----------------------------------------------------------
    def _facts(self, hosts, used_in: str) -> dict[BDF, topology.HostFacts]:
        """Facts of ``hosts`` and the exported functions, when mode ``used_in`` needs them."""
        if self.mode != used_in:
            return {}
        return {h: self.host_facts(h) for h in set(hosts) | set(self.exported)}

    def _enter(self, state: int, announce: bool = True) -> list:
        """The one place the state changes; ``announce`` writes it to our ``state`` node too."""
        self.state = S(state)
        return [SwitchState(self.state)] if announce else []

    def _fatal(self, err: int, message: str) -> list:
        # the Fatal effect writes Closing itself, after the error node
        return self._enter(S.Closing, announce=False) + [Fatal(err, message)]

    def _export(self, wanted: list[DevEntry]) -> list:
        """Place and export ``wanted`` devices; publish every exported one."""
        if self.backend.broken:
            return self._fatal(errno.EINVAL, self.backend.broken)
        new = [d for d in wanted if d.host not in self.exported]
        try:
            placement = topology.place(
                self.mode, [d.host for d in new], self.exported,
                {d.host: d.vdevfn >> 3 for d in new if d.vdevfn is not None},
                self._facts((d.host for d in new), "vpci"))
        except topology.TopologyError as exc:
            return self._fatal(errno.ENOSPC, str(exc))
        added = tuple((h, g) for h, g in placement.items() if h not in self.exported)
        self.exported = placement
        effects: list = []
        if added:
            effects.append(ExportDevices(added, tuple((d.host, d.opts) for d in new)))
        effects.append(self._publish())
        return effects

    def _publish(self) -> Publish:
        vdevs = tuple((d.index, self.exported[d.host].vdev_text)
                      for d in self.backend.devs if d.host in self.exported)
        roots = topology.roots(self.mode, self.exported, self._facts((), "passthrough"))
        return Publish(vdevs, tuple(roots))

    def _try_attach(self) -> list:
        fe = self.frontend
        if self.state != S.Initialised or fe.untrusted_state != str(int(S.Initialised)):
            return []
        if fe.untrusted_magic != XEN_PCI_MAGIC:
            return self._fatal(errno.EFAULT, f"version mismatch ({(fe.untrusted_magic or '')[:16]}/"
                                             f"{XEN_PCI_MAGIC}) with pcifront - halting pcibackd")
        gref = parse_uint(fe.untrusted_gref, 0xFFFFFFFF)
        port = parse_uint(fe.untrusted_evtchn, 0xFFFFFFFF)
        if gref is None or port is None:
            return self._fatal(errno.EINVAL, "error reading configuration from frontend "
                                             "(pci-op-ref / event-channel)")
        self.ring = True
        return [MapRing(gref, port)] + self._enter(S.Connected)

    def _disconnect(self) -> list:
        if not self.ring:
            return []
        self.ring = False
        return [UnmapRing()]

    def _fe_state(self) -> int | None:
        return parse_uint(self.frontend.untrusted_state, 8) if self.frontend.exists else None

    # -- handlers (the values of TRANSITIONS) -----------------------------
    def on_probe(self, ev: Probe) -> list:
        """Fresh backend: InitWait then set up; a restarted worker resumes."""
        self.backend, self.frontend = ev.backend, ev.frontend
        node = ev.backend.state
        if node in (None, S.Unknown, S.Initialising, S.InitWait):
            return self._enter(S.InitWait) + self._setup()
        if node in RESUMABLE:
            # Worker restart: devices already published; re-serve them silently.
            self._enter(node, announce=False)
            live = [d for d in ev.backend.devs if d.state == S.Initialised]
            try:
                self.exported = self._resume_placement(live)
            except topology.TopologyError as exc:
                return self._fatal(errno.EINVAL, f"cannot resume device placement: {exc}")
            effects: list = [ExportDevices(tuple(self.exported.items()),
                                           tuple((d.host, d.opts) for d in live), resume=True),
                             self._publish()] if live else []
            fe = parse_uint(ev.frontend.untrusted_state, 8) if ev.frontend.exists else None
            if node == S.Initialised:
                return effects + self._try_attach()
            if fe in (S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured) and node != S.Initialised:
                gref = parse_uint(ev.frontend.untrusted_gref, 0xFFFFFFFF)
                port = parse_uint(ev.frontend.untrusted_evtchn, 0xFFFFFFFF)
                if gref is None or port is None:
                    return effects + self._fatal(errno.EINVAL, "frontend configuration unreadable on resume")
                self.ring = True
                effects.append(MapRing(gref, port))
            return effects
        self._enter(node, announce=False)
        return [Exit(f"backend state {node} at start: nothing to serve")] if node == S.Closed else []

    def _resume_placement(self, live: list[DevEntry]) -> dict[BDF, BDF]:
        """Keep every guest address we published (vdev-N); place only the rest.

        A restarted worker must never move a device the guest already uses.
        """
        kept: dict[BDF, BDF] = {}
        for d in live:
            v = d.vdev
            if v is None or v in kept.values() or (self.mode == "vpci" and (v.domain, v.bus) != (0, 0)) \
                    or (self.mode == "passthrough" and v != d.host):
                continue
            kept[d.host] = v
        rest = [d for d in live if d.host not in kept]
        return topology.place(self.mode, [d.host for d in rest], kept,
                              {d.host: d.vdevfn >> 3 for d in rest if d.vdevfn is not None},
                              self._facts((d.host for d in live), "vpci"))

    def _setup(self) -> list:
        """InitWait: export every device with ``state-N`` 1 (or 3: published by a
        predecessor that died before switching state), then Initialised."""
        wanted = [d for d in self.backend.devs if d.state in (S.Initialising, S.Initialised)]
        if not wanted and not self.backend.broken:
            return []    # libxl writes devices and num_devs in one transaction: wait for it
        effects = self._export(wanted)
        if self.state == S.Closing:      # placement failed: fatal already issued
            return effects
        return effects + self._enter(S.Initialised) + self._try_attach()

    def on_backend_initwait(self, ev: BackendChanged) -> list:
        closing = self._toolstack_closing(ev)
        if closing is not None:
            return closing
        self.backend = ev.backend
        return self._setup()

    def _toolstack_closing(self, ev: BackendChanged) -> list | None:
        """The toolstack tore us down before the guest connected."""
        if ev.backend.state == S.Closing and (self.state, S.Closing) in TOOLSTACK_MOVES:
            return self.on_backend_running(ev)
        return None

    def on_backend_initialised(self, ev: BackendChanged) -> list:
        """Devices added before the guest connected (no Reconfigured step)."""
        closing = self._toolstack_closing(ev)
        if closing is not None:
            return closing
        self.backend = ev.backend
        wanted = [d for d in ev.backend.devs if d.state == S.Initialising]
        return self._export(wanted) if wanted or ev.backend.broken else []

    def on_backend_running(self, ev: BackendChanged) -> list:
        """Connected/Reconfigured/...: follow toolstack writes of our state node."""
        self.backend = ev.backend
        node = ev.backend.state
        if node is not None and node != self.state and (self.state, node) in TOOLSTACK_MOVES:
            self._enter(node, announce=False)          # the toolstack wrote it already
            if node == S.Closing and not ev.backend.online:
                return self._disconnect() + self._enter(S.Closed)
        return []

    def on_frontend(self, ev: FrontendChanged) -> list:
        """Frontend moves, per our state (xen_pcibk_frontend_changed)."""
        self.frontend = ev.frontend
        fe = self._fe_state()
        if not ev.frontend.exists or fe == S.Unknown:
            return self._disconnect() + [Exit("frontend gone")]
        if fe == S.Initialised:
            return self._try_attach()
        if fe == S.Connected and self.state in (S.Reconfigured, S.Connected):
            return self._enter(S.Connected) if self.state != S.Connected else []
        if fe == S.Reconfiguring and self.state == S.Reconfiguring:
            return self._reconfigure()
        if fe == S.Closing and self.state not in (S.Closed,):
            return self._disconnect() + (self._enter(S.Closing) if self.state != S.Closing else [])
        if fe == S.Closed:
            effects = self._disconnect() + (self._enter(S.Closed) if self.state != S.Closed else [])
            return effects + ([] if self.backend.online else [Exit("frontend closed, backend offline")])
        return []

    def _reconfigure(self) -> list:
        """Hot-plug/unplug: export ``state-N=1``, remove ``state-N=5``, then Reconfigured."""
        gone = tuple(d.host for d in self.backend.devs if d.state == S.Closing and d.host in self.exported)
        effects: list = []
        if gone:
            for h in gone:
                del self.exported[h]
            effects.append(RemoveDevices(gone))
        wanted = [d for d in self.backend.devs if d.state == S.Initialising]
        effects += self._export(wanted) if wanted or self.backend.broken else [self._publish()]
        if self.state == S.Closing:      # placement failed → fatal
            return effects
        return effects + self._enter(S.Reconfigured)

    def on_effect_failed(self, ev: EffectFailed) -> list:
        if isinstance(ev.effect, MapRing):
            self.ring = False
        return self._fatal(ev.err, ev.reason)

    def on_bad_frontend_path(self, ev: BadFrontendPath) -> list:
        return self._fatal(errno.EINVAL, ev.message) + [Exit("bad frontend path")]

    def on_gone(self, ev: BackendGone) -> list:
        return self._disconnect() + [Exit("backend directory removed")]

    def ignore(self, ev) -> list:
        return []


# Toolstack writes to our state node that we follow.
TOOLSTACK_MOVES = {
    (S.Connected, S.Reconfiguring),
    *((s, S.Closing) for s in (S.InitWait, S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured)),
}
RESUMABLE = (S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured, S.Closing)

_LIVE = (S.InitWait, S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured, S.Closing, S.Closed)

Handler = Callable[[BackendMachine, object], list]

TRANSITIONS: dict[tuple[int, type], Handler] = {
    (S.Initialising, Probe): BackendMachine.on_probe,
    (S.Initialising, BadFrontendPath): BackendMachine.on_bad_frontend_path,
    (S.InitWait, BackendChanged): BackendMachine.on_backend_initwait,
    (S.Initialised, BackendChanged): BackendMachine.on_backend_initialised,
    **{(s, BackendChanged): BackendMachine.on_backend_running
       for s in (S.Connected, S.Reconfiguring, S.Reconfigured, S.Closing, S.Closed)},
    **{(s, FrontendChanged): BackendMachine.on_frontend for s in _LIVE},
    **{(s, EffectFailed): BackendMachine.on_effect_failed for s in _LIVE},
    **{(s, BackendGone): BackendMachine.on_gone for s in (S.Initialising, *_LIVE)},
    (S.Initialising, FrontendChanged): BackendMachine.ignore,
}


def render_table() -> str:
    """The transition table as text (the module docstring embeds it)."""
    rows = [f"    {S(s).name:<14} {i.__name__:<16} -> {h.__name__}" for (s, i), h in
            sorted(TRANSITIONS.items(), key=lambda kv: (kv[0][0], kv[0][1].__name__))]
    return "\n".join(rows)


if __doc__ is not None:              # None under python -OO
    __doc__ = __doc__.replace("{table}", render_table())
