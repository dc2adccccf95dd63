"""The backend and frontend directories as the xenbus machine sees them.

Pure: a dict of node values in (untrusted: the toolstack writes the backend
directory, the guest the frontend one), validated snapshots out.  Everything a
snapshot cannot vouch for stays named ``untrusted_...``; a bad ``dev-N`` entry
is dropped with a line in ``problems``, a device list that cannot be read at
all is ``broken`` (the machine turns that into a xenbus fatal error).
"""

from __future__ import annotations

from dataclasses import dataclass

from pcibackd.wire.bdf import BDF

MAX_DEVS = 256          # 32 slots x 8 functions: more cannot be placed anyway
KNOWN_OPTS = {"permissive", "msitranslate", "power_mgmt", "rdm_policy", "seize"}
FRONTEND_KEYS = ("state", "pci-op-ref", "event-channel", "magic")


@dataclass(frozen=True)
class DevEntry:
    """One ``dev-N`` of the backend directory (validated)."""

    index: int
    host: BDF
    state: int | None
    vdevfn: int | None = None
    opts: tuple[tuple[str, str], ...] = ()
    vdev: BDF | None = None       # our own published vdev-N (read back on resume)


@dataclass(frozen=True)
class BackendNodes:
    """A validated snapshot of ``/local/domain/0/backend/pci/<domid>/0``."""

    state: int | None
    online: bool
    devs: tuple[DevEntry, ...] = ()
    problems: tuple[str, ...] = ()     # entries ignored, one line each
    broken: str | None = None          # the device list cannot be parsed: xenbus fatal


@dataclass(frozen=True)
class FrontendNodes:
    """The frontend directory as read (still untrusted)."""

    exists: bool
    untrusted_state: str | None = None
    untrusted_gref: str | None = None
    untrusted_evtchn: str | None = None
    untrusted_magic: str | None = None


_BACKEND_KEYS = ("state", "online", "num_devs")
_BACKEND_PREFIXES = ("dev-", "vdevfn-", "state-", "opts-", "vdev-")


def backend_key_used(name: str) -> bool:
    """Whether :func:`parse_backend` looks at the backend node ``name`` (others need no read)."""
    return name in _BACKEND_KEYS or name.startswith(_BACKEND_PREFIXES)


def parse_uint(untrusted: str | None, limit: int) -> int | None:
    """A decimal node value ``<= limit``; None for anything else (absent, signs, spaces, huge)."""
    if untrusted is None or not untrusted.isascii() or not untrusted.isdigit() or len(untrusted) > 10:
        return None
    value = int(untrusted)
    return value if value <= limit else None


def parse_frontend(untrusted_values: dict[str, str | None], exists: bool) -> FrontendNodes:
    """The :data:`FRONTEND_KEYS` of the frontend directory (None: absent)."""
    return FrontendNodes(exists, untrusted_values.get("state"), untrusted_values.get("pci-op-ref"),
                         untrusted_values.get("event-channel"), untrusted_values.get("magic"))


def parse_backend(untrusted_nodes: dict[str, str]) -> BackendNodes:
    """Validate a backend directory snapshot; bad entries become ``problems``."""
    problems: list[str] = []
    state = parse_uint(untrusted_nodes.get("state"), 8)
    online = untrusted_nodes.get("online") == "1"
    untrusted_num = untrusted_nodes.get("num_devs")
    num = parse_uint(untrusted_num, MAX_DEVS) if untrusted_num is not None else 0
    broken = None
    if num is None:
        broken = f"error reading number of devices: num_devs {untrusted_num[:20]!r} is not a count <= {MAX_DEVS}"
        problems.append(broken)
        num = 0
    devs: list[DevEntry] = []
    for i in range(num):
        untrusted_dev = untrusted_nodes.get(f"dev-{i}")
        if untrusted_dev is None:
            continue     # renumbering in progress: the toolstack rewrites in one transaction
        try:
            host = BDF.parse(untrusted_dev)
        except ValueError:
            broken = broken or f"error parsing pci device configuration: dev-{i} {untrusted_dev[:40]!r}"
            problems.append(f"dev-{i} {untrusted_dev[:40]!r} is not a PCI address")
            continue
        untrusted_vdevfn = untrusted_nodes.get(f"vdevfn-{i}")
        vdevfn = None
        if untrusted_vdevfn is not None:
            try:
                vdevfn = int(untrusted_vdevfn, 16)
            except ValueError:
                vdevfn = -1
            if not 0 <= vdevfn <= 0xFF:
                problems.append(f"vdevfn-{i} {untrusted_vdevfn[:20]!r} ignored")
                vdevfn = None
        devs.append(DevEntry(i, host, parse_uint(untrusted_nodes.get(f"state-{i}"), 8), vdevfn,
                             parse_opts(untrusted_nodes.get(f"opts-{i}", ""), problems),
                             parse_vdev(untrusted_nodes.get(f"vdev-{i}"))))
    return BackendNodes(state, online, tuple(devs), tuple(problems), broken)


def parse_vdev(untrusted: str | None) -> BDF | None:
    """``vdev-N`` as published (``dddd:bb:dd.ff``, function in two digits); None if unusable."""
    if untrusted is None:
        return None
    head, dot, fn = untrusted.rpartition(".")
    if not dot or not fn.isascii() or not fn.isdigit() or len(fn) > 2:
        return None
    try:
        return BDF.parse(f"{head}.{int(fn)}")
    except ValueError:
        return None


def parse_opts(untrusted_opts: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """``k=v,k=v`` of ``opts-N``; unknown keys are reported and dropped."""
    out = []
    for item in untrusted_opts.split(",") if untrusted_opts else ():
        key, _, value = item.partition("=")
        if key in KNOWN_OPTS and value.isascii() and len(value) <= 32:
            out.append((key, value))
        else:
            problems.append(f"unknown option {item[:40]!r} ignored")
    return tuple(out)
