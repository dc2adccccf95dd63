"""conf_read round-trip latency through pcibackd vs the bare transport floor.

Both modes, in one run:
  busy-poll      the worker busy-polls the flag after each op (window 50 us),
                 the frontend spins on the flag
  event-channel  the worker blocks on the event channel (window 0), the
                 frontend waits on its event channel like Linux pcifront
The floor is a trivial responder on the same page and channel mechanism (map
the grant, bind the port, answer with a constant) in the same wait mode; the
frontend side is the same PCIFront.op() code.  Target: ratio <= 2.0.

    python bench/oplat.py [--ops N]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time

from simdom0.pcifront import PCIFront
from pcibackd.wire.bdf import BDF
from simdom0.dom0 import SimDom0
from pcibackd.wire import pciif
from pcibackd.wire.pciif import Op


def measure(front: PCIFront, bdf: BDF, ops: int) -> list[int]:
    lat = []
    op, clock = front.op, time.perf_counter_ns
    for _ in range(200):
        op(Op.conf_read, bdf.domain, bdf.bus, bdf.devfn, 0, 4)
    for _ in range(ops):
        t0 = clock()
        err, _ = op(Op.conf_read, bdf.domain, bdf.bus, bdf.devfn, 0, 4)
        lat.append(clock() - t0)
        assert err == 0
    return lat


def pct(values: list[int], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000.0


def responder(sim_dir: str, domid: int, gref: int, port: int, spin: bool) -> None:
    """The floor: answer every op with a constant, as fast as the transport allows."""
    from simdom0.platform import SimPlatform
    plat = SimPlatform(sim_dir, 0)
    page = plat.map_grant(domid, gref)
    ch = plat.open_evtchn()
    local = ch.bind_interdomain(domid, port)
    buf, fd = page.buf, ch.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    print("ready", flush=True)
    while True:
        if spin:
            while not buf[0] & 1:
                pass
        else:
            poller.poll()
            p = ch.pending()
        while buf[0] & 1:
            snap = bytes(buf[pciif.SH_OP:pciif.SH_OP + pciif.PCI_OP.size])   # same copy-out as pcibackd
            pciif.I32.pack_into(buf, pciif.SH_OP_ERR, 0)
            pciif.U32.pack_into(buf, pciif.SH_OP_VALUE, 0x11E81234 if snap else 0)
            page.clear_bit(pciif.SH_FLAGS, pciif._XEN_PCIF_active)
            ch.notify(local)
        if not spin and p is not None:
            ch.unmask(p)


def floor(dom0: SimDom0, domid: int, ops: int, spin: bool) -> list[int]:
    from simdom0.platform import SimPlatform
    plat = SimPlatform(dom0.sim_dir, domid)
    front = PCIFront(None, plat, domid, spin=spin)
    front.gref, front.page = plat.grant_page(0)
    front.evtchn = plat.open_evtchn()
    front.port = front.evtchn.alloc_unbound(0)
    proc = subprocess.Popen([sys.executable, __file__, "--responder", str(dom0.sim_dir), str(domid),
                             str(front.gref), str(front.port), "1" if spin else "0"],
                            stdout=subprocess.PIPE, text=True, env=dom0._env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        return measure(front, BDF(0, 0, 0, 0), ops)
    finally:
        proc.kill()
        proc.wait()
        front._release()


def through_pcibackd(ops: int, spin: bool, window_us: float) -> tuple[list[int], list[int]]:
    with SimDom0(log_level="WARNING", poll_window_us=window_us) as dom0:
        dom0.start()
        dom0.add_device("edu", "0000:00:05.0")
        dom0.create_guest(1, ["0000:00:05.0"])
        front = dom0.frontend(1, spin=spin)
        front.connect()
        lat = measure(front, BDF(0, 0, 0, 0), ops)
        return lat, floor(dom0, 7, ops, spin)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--responder", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.responder:
        sim_dir, domid, gref, port, spin = args.responder
        responder(sim_dir, int(domid), int(gref), int(port), spin == "1")
        return 0
    print(f"bench/oplat: conf_read round trips, {args.ops} ops per case, {os.cpu_count()} CPUs")
    print(f"{'mode':<14} {'path':<10} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    ok = True
    for mode, spin, window in (("busy-poll", True, 50.0), ("event-channel", False, 0.0)):
        lat, base = through_pcibackd(args.ops, spin, window)
        for name, v in (("pcibackd", lat), ("floor", base)):
            print(f"{mode:<14} {name:<10} {pct(v, 50):8.1f} {pct(v, 99):8.1f} {statistics.mean(v) / 1000:8.1f}")
        r50, r99 = pct(lat, 50) / pct(base, 50), pct(lat, 99) / pct(base, 99)
        ok &= r50 <= 2.0
        print(f"{mode:<14} ratio p50 {r50:.2f}  p99 {r99:.2f}  (target p50 ratio <= 2.0)")
    print("oplat: " + ("target met" if ok else "TARGET MISSED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
