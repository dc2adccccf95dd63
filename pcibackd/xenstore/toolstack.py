"""The toolstack side of PCI passthrough: xenstore nodes exactly as libxl writes them.

Used by the simulated dom0 (demo, tests) and, on a real dom0 where a guest
was created without ``pci=``, from the shell (``python -m
pcibackd.xenstore.toolstack attach``, see :func:`main`).  Paths, keys, formats
and permissions follow ``libxl__create_pci_backend`` and
``libxl__device_pci_{add,remove}_xenstore`` (see docs/pciback-protocol.md §2).
"""

from __future__ import annotations

import argparse
import select
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pcibackd.hostpci.seize import is_seized, release as unseize, seize
from pcibackd.platform import xenctrl
from pcibackd.wire.bdf import BDF
# the node paths stay importable from here
from pcibackd.wire.paths import backend_domain_path, backend_path, frontend_path
from pcibackd.wire.pciif import XenbusState as S
from pcibackd.xenstore.client import XenStore

DEFAULT_OPTS = "msitranslate=0,power_mgmt=0,permissive=0,rdm_policy=strict"


@dataclass
class Toolstack:
    """libxl's PCI xenstore writes, over a ``pcibackd.xenstore.client.XenStore``."""

    xs: object
    timeout: float = 10.0     # LIBXL_DESTROY_TIMEOUT is 10 s

    def create_domain(self, domid: int, name: str) -> None:
        """The bits of ``/local/domain/<domid>`` a PV guest has (simulated dom0 only)."""
        dom = f"/local/domain/{domid}"

        def tx(t):
            # Permissions first: new nodes inherit their parent's (libxl__device_generic_add).
            t.mkdir(dom)
            t.set_perms(dom, ["n0", f"r{domid}"])
            t.write(f"{dom}/name", name)
            t.write(f"{dom}/domid", str(domid))
            t.mkdir(f"{dom}/device")
            t.set_perms(f"{dom}/device", [f"n{domid}", "r0"])
        self.xs.run_transaction(tx)

    def attach(self, domid: int, bdf: BDF | list[BDF], opts: str = DEFAULT_OPTS, vdevfn: int | None = None,
               name: str | None = None, starting: bool | None = None, wait: bool = True,
               require_domain: bool = False) -> list[int]:
        """Add devices in one transaction; returns their indices N.

        ``starting`` (default: the backend does not exist yet) is libxl's
        domain-creation case; otherwise this is a hot-plug: wait for the
        backend to be Connected, then write backend ``state=7``.
        ``require_domain``: LookupError, nothing written, when the domain is gone.
        """
        bdfs = [bdf] if isinstance(bdf, BDF) else list(bdf)
        be, fe = backend_path(domid), frontend_path(domid)
        if starting is None:
            starting = self.xs.read(f"{be}/state") is None
        if not starting and wait:
            self.wait_state(domid, S.Connected)
        result: list[int] = []

        def tx(t):
            result.clear()
            if require_domain and t.read(f"/local/domain/{domid}/name") is None:
                raise LookupError(f"domain {domid} does not exist (any more)")
            if t.read(f"{be}/state") is None:
                domname = t.read(f"/local/domain/{domid}/name") or f"domain-{domid}"
                # Permissions before children: new nodes inherit their parent's.
                t.mkdir(be)
                t.set_perms(be, ["n0", f"r{domid}"])
                for k, v in (("frontend", fe), ("frontend-id", str(domid)), ("online", "1"),
                             ("state", str(int(S.Initialising))), ("domain", domname)):
                    t.write(f"{be}/{k}", v)
                t.mkdir(fe)
                t.set_perms(fe, [f"n{domid}", "r0"])
                for k, v in (("backend", be), ("backend-id", "0"), ("state", str(int(S.Initialising)))):
                    t.write(f"{fe}/{k}", v)
            n = int(t.read(f"{be}/num_devs") or "0")
            for b in bdfs:
                t.write(f"{be}/key-{n}", str(b))
                t.write(f"{be}/dev-{n}", str(b))
                if vdevfn is not None:
                    t.write(f"{be}/vdevfn-{n}", f"{vdevfn:x}")
                if name:
                    t.write(f"{be}/name-{n}", name)
                t.write(f"{be}/opts-{n}", opts)
                t.write(f"{be}/state-{n}", str(int(S.Initialising)))
                result.append(n)
                n += 1
            t.write(f"{be}/num_devs", str(n))
            if not starting:
                t.write(f"{be}/state", str(int(S.Reconfiguring)))
        self.xs.run_transaction(tx)
        return result

    def detach(self, domid: int, bdf: BDF, wait: bool = True) -> None:
        """Hot-unplug: ``state-i=5`` + backend 7, wait for 4, then renumber."""
        be = backend_path(domid)
        if wait:
            self.wait_state(domid, S.Connected)
        self.begin_detach(domid, bdf)
        if wait:
            self.wait_state(domid, S.Connected)
        self.remove_nodes(domid, bdf)

    def begin_detach(self, domid: int, bdf: BDF) -> None:
        """Ask the backend to unplug ``bdf``: ``state-i=5`` and backend ``state=7`` (LookupError: not there)."""
        be = backend_path(domid)
        index = self._index_of(domid, bdf)

        def mark(t):
            t.write(f"{be}/state-{index}", str(int(S.Closing)))
            t.write(f"{be}/state", str(int(S.Reconfiguring)))
        self.xs.run_transaction(mark)

    def remove_nodes(self, domid: int, bdf: BDF) -> None:
        """Remove ``bdf``'s ``*-N`` nodes and renumber the ones after it (libxl's last detach step)."""
        be = backend_path(domid)

        def renumber(t):
            index = None
            num = int(t.read(f"{be}/num_devs") or "0")
            for i in range(num):
                if _same(t.read(f"{be}/dev-{i}"), bdf):
                    index = i
            if index is None:
                return
            keys = ("state", "key", "dev", "vdev", "opts", "vdevfn", "name")
            for k in keys:
                t.rm(f"{be}/{k}-{index}")
            for j in range(index + 1, num):
                for k in keys:
                    v = t.read(f"{be}/{k}-{j}")
                    if v is not None:
                        t.write(f"{be}/{k}-{j - 1}", v)
                        t.rm(f"{be}/{k}-{j}")
            t.write(f"{be}/num_devs", str(num - 1))
        self.xs.run_transaction(renumber)

    def destroy(self, domid: int, wait: bool = True) -> bool:
        """Teardown: ``online=0``, state 5, wait for 6, remove both directories.

        Returns True when the backend reached Closed before the timeout.
        """
        be, fe = backend_path(domid), frontend_path(domid)

        def tx(t):
            t.write(f"{be}/online", "0")
            if t.read(f"{be}/state") != str(int(S.Closed)):
                t.write(f"{be}/state", str(int(S.Closing)))
        self.xs.run_transaction(tx)
        closed = self.wait_state(domid, S.Closed, raise_on_timeout=False) if wait else False
        self.xs.rm(fe)
        self.xs.rm(be)
        self.xs.rm(backend_domain_path(domid))
        return closed

    def _index_of(self, domid: int, bdf: BDF) -> int:
        be = backend_path(domid)
        for i in range(int(self.xs.read(f"{be}/num_devs") or "0")):
            if _same(self.xs.read(f"{be}/dev-{i}"), bdf):
                return i
        raise LookupError(f"{bdf} is not attached to domain {domid}")

    def wait_state(self, domid: int, state: int, raise_on_timeout: bool = True) -> bool:
        """Wait (on a watch) until the backend ``state`` node equals ``state``."""
        return wait_for_value(self.xs, f"{backend_path(domid)}/state", str(int(state)),
                              self.timeout, raise_on_timeout)


def _same(untrusted: str | None, bdf: BDF) -> bool:
    try:
        return untrusted is not None and BDF.parse(untrusted) == bdf
    except ValueError:
        return False


def wait_for_value(xs, path: str, value: str | None, timeout: float, raise_on_timeout: bool = True) -> bool:
    """Block on a xenstore watch until ``path`` reads ``value`` (None = absent)."""
    token = f"wait-{id(path)}-{time.monotonic_ns()}"
    xs.watch(path, token)
    try:
        deadline = time.monotonic() + timeout
        poller = select.poll()       # poll, not select(): a harness may hold more than 1024 fds
        poller.register(xs.fileno(), select.POLLIN)
        while True:
            if xs.read(path) == value:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                if raise_on_timeout:
                    raise TimeoutError(f"{path} did not become {value!r} within {timeout} s "
                                       f"(now {xs.read(path)!r})")
                return False
            poller.poll(left * 1000 + 1)
            xs.events()
    finally:
        xs.unwatch(path, token)


def main(argv: list[str] | None = None) -> int:
    """``python -m pcibackd.xenstore.toolstack``: libxl's PCI xenstore writes from a shell.

    For a guest created by ``xl create`` without ``pci=``: attach gives it a
    device (hot-plug when it runs), detach takes one away, destroy tears the
    PCI backend down.  ``--seize`` first keeps the function away from dom0's
    drivers (unbind + driver_override=pci-stub; detach/destroy restore it).
    ``--permissions`` (real Xen) adds libxl's hypervisor part: quarantine, the
    guest's BARs and IRQ, IOMMU assignment; and on detach/destroy its undoing.
    """
    p = argparse.ArgumentParser(prog="python -m pcibackd.xenstore.toolstack", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xenstored-path", help="xenstored socket (default $XENSTORED_PATH or the system one)")
    p.add_argument("--state-dir", default="/run/pcibackd", help="where seize records live (default /run/pcibackd)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the backend (default 10)")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attach", help="give DOMID the function BDF")
    a.add_argument("domid", type=int)
    a.add_argument("bdf")
    a.add_argument("--opts", default=DEFAULT_OPTS, help=f"opts-N value (default {DEFAULT_OPTS})")
    a.add_argument("--seize", action="store_true", help="unbind from dom0's driver, bind pci-stub first")
    a.add_argument("--permissions", action="store_true",
                   help="real Xen: do libxl's hypervisor part too: quarantine the function at seize, grant "
                        "the guest its BARs and legacy IRQ, and assign it to the guest in the IOMMU")
    d = sub.add_parser("detach", help="take BDF away from DOMID (hot-unplug)")
    d.add_argument("domid", type=int)
    d.add_argument("bdf")
    d.add_argument("--permissions", action="store_true",
                   help="real Xen: revoke the grants and deassign the function (back to quarantine)")
    x = sub.add_parser("destroy", help="tear down DOMID's PCI backend and release seized devices")
    x.add_argument("domid", type=int)
    x.add_argument("--permissions", action="store_true",
                   help="real Xen: revoke the guest's grants and IOMMU assignment, then take released "
                        "functions out of quarantine, back to dom0")
    args = p.parse_args(argv)
    try:
        with XenStore(args.xenstored_path) as xs:
            return COMMANDS[args.cmd](Toolstack(xs, timeout=args.timeout), args, Path(args.state_dir))
    except (OSError, TimeoutError, ValueError, LookupError) as exc:     # SeizeError and PlatformError are OSErrors
        print(f"toolstack: {exc}", file=sys.stderr)
        return 1


def _cmd_attach(ts: Toolstack, args, state) -> int:
    """Seize, grant and assign (as asked), then write the nodes; all or nothing."""
    bdf = BDF.parse(args.bdf)
    if ts.xs.read(f"/local/domain/{args.domid}/name") is None:
        print(f"domain {args.domid} does not exist", file=sys.stderr)
        return 1
    newly_seized = args.seize and not is_seized(bdf, state)
    try:
        if args.seize:
            seize(bdf, state)
        if args.permissions:
            if newly_seized:
                print(xenctrl.assign_device(xenctrl.DOMID_IO, bdf))
            print(f"dom{args.domid}: granted " + ", ".join(xenctrl.grant_device(args.domid, bdf)))
            print(xenctrl.assign_device(args.domid, bdf))
        n = ts.attach(args.domid, bdf, opts=args.opts)
    except BaseException:
        # no half-granted guest, no function left seized by this call
        try:
            _undo(args.domid, bdf, state, args.permissions, release=newly_seized)
        except OSError as exc:
            print(f"toolstack: undoing the failed attach: {exc}", file=sys.stderr)
        raise
    print(f"dom{args.domid}: {bdf} attached as dev-{n[0]}")
    return 0


def _cmd_detach(ts: Toolstack, args, state) -> int:
    bdf = BDF.parse(args.bdf)
    try:
        ts.detach(args.domid, bdf)
    finally:
        _undo(args.domid, bdf, state, args.permissions, release=True)
    print(f"dom{args.domid}: {bdf} detached")
    return 0


def _cmd_destroy(ts: Toolstack, args, state) -> int:
    base = backend_path(args.domid)
    devs = [ts.xs.read(f"{base}/dev-{i}") for i in range(int(ts.xs.read(f"{base}/num_devs") or "0"))]
    try:
        closed = ts.destroy(args.domid)
    finally:
        for d in filter(None, devs):
            _undo(args.domid, BDF.parse(d), state, args.permissions, release=True)
    print(f"dom{args.domid}: PCI backend {'closed' if closed else 'removed after timeout'}")
    return 0


COMMANDS = {"attach": _cmd_attach, "detach": _cmd_detach, "destroy": _cmd_destroy}


def _undo(domid: int, bdf: BDF, state, permissions: bool, release: bool) -> None:
    """Take ``bdf`` back from ``domid`` (grants, IOMMU) and, if ``release``, give a
    function seized here back to dom0: out of quarantine first, as
    pci-assignable-remove does, and only once no guest holds it."""
    if permissions:
        for line in xenctrl.revoke_device(domid, bdf):
            print(line)
    if not release or not is_seized(bdf, state):
        return
    if permissions:
        print(xenctrl.deassign_device(xenctrl.DOMID_IO, bdf))
    unseize(bdf, state)


if __name__ == "__main__":
    raise SystemExit(main())
