"""A fake ``xl`` for the simulated dom0: the few subcommands ``pcibackctl create`` runs.

``create [-p] [opts] CFG``, ``unpause DOM``, ``destroy DOM``, ``domid NAME``,
``list``.  A domain is its xenstore nodes (as the toolstack writes them for a PV
guest); "paused" is the node ``/local/domain/N/sim-paused``; ``destroy`` tears
the PCI backend down the way libxl does (online=0, Closing, wait for Closed,
remove).  The config is parsed with pcibackd's own xl parser, so a config this
xl accepts is one pcibackctl accepts.  Run as ``python -m simdom0.xl`` with
XENSTORED_PATH naming the simulated xenstored.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pcibackd.wire.paths import backend_path
from pcibackd.xenstore.client import XenStore
from pcibackd.xenstore.toolstack import Toolstack
from pcibackd.xl.cfg import CfgError, parse_config

DESTROY_TIMEOUT = 5.0


def _domains(xs) -> dict[int, str | None]:
    return {int(d): xs.read(f"/local/domain/{d}/name") for d in xs.ls("/local/domain") if d.isdigit()}


def _find(xs, untrusted: str) -> int:
    doms = _domains(xs)
    if untrusted.isdigit() and int(untrusted) in doms:
        return int(untrusted)
    for domid, name in doms.items():
        if name == untrusted:
            return domid
    raise LookupError(f"'{untrusted}' is an invalid domain identifier")


def create(xs, args: list[str]) -> int:
    paused = "-p" in args
    rest = [a for a in args if not a.startswith("-")]
    if not rest:
        raise ValueError("xl create: no config file")
    path = rest[0]
    try:
        cfg = parse_config(Path(path).read_text(), path)
    except CfgError as exc:
        raise ValueError(f"Failed to parse config: {exc}") from None
    if cfg.get("pci"):
        raise ValueError("this simulated xl has no PCI support (pcibackctl create takes pci= out)")
    name = cfg.get("name")
    if not isinstance(name, str) or name in _domains(xs).values():
        raise ValueError(f"domain name {name!r} missing or already in use")
    domid = max(_domains(xs), default=0) + 1
    Toolstack(xs).create_domain(domid, name)
    if paused:
        xs.write(f"/local/domain/{domid}/sim-paused", "1")
    print(f"Parsing config from {path}", file=sys.stderr)
    return 0


def unpause(xs, args: list[str]) -> int:
    domid = _find(xs, args[0])
    xs.rm(f"/local/domain/{domid}/sim-paused")
    return 0


def destroy(xs, args: list[str]) -> int:
    domid = _find(xs, args[0])
    if xs.read(f"{backend_path(domid)}/state") is not None:
        Toolstack(xs, timeout=DESTROY_TIMEOUT).destroy(domid)
    xs.rm(f"/local/domain/{domid}")
    return 0


def domid(xs, args: list[str]) -> int:
    print(_find(xs, args[0]))
    return 0


def list_(xs, args: list[str]) -> int:
    print("Name                                        ID   State")
    for d, name in sorted(_domains(xs).items()):
        state = "--p---" if xs.read(f"/local/domain/{d}/sim-paused") else "r-----"
        print(f"{name or '?':<40} {d:>5}   {state}")
    return 0


COMMANDS = {"create": create, "unpause": unpause, "destroy": destroy, "domid": domid, "list": list_}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: xl {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    try:
        with XenStore() as xs:
            return COMMANDS[argv[0]](xs, argv[1:])
    except (LookupError, ValueError, OSError, TimeoutError) as exc:
        print(f"xl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
