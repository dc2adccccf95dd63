"""The bring-up figure of bench/scale.py alone, for one guest count, with its phases.

Toolstack writes for every guest -> every frontend Connected (the same
``bring_up`` as bench/scale.py), split into the harness's phases, and the CPU
each party took: the daemon tree (supervisor, fork server, workers), oxenstored
and this harness itself (the simulated toolstack and frontends, not the product).

    python bench/bringup.py 256            # one run
    python bench/bringup.py 64 256 --runs 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import IN_FLIGHT, bring_up, cpu_seconds, daemon_tree, raise_nofile, wait_running  # noqa: E402
from simdom0.dom0 import SimDom0  # noqa: E402


def harness_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(n: int, in_flight: int) -> dict:
    with SimDom0(log_level="WARNING") as dom0:
        dom0.start()
        xsd = psutil.Process(dom0.xenstored.pid)
        procs = daemon_tree(dom0)
        tree0, xsd0, own0, sup0 = cpu_seconds(procs), cpu_seconds([xsd]), harness_cpu(), cpu_seconds(procs[:1])
        phases: dict[str, float] = {}
        took, _ = bring_up(dom0, n, phases=phases, in_flight=in_flight)
        procs = daemon_tree(dom0)
        tree, xsdc, own = cpu_seconds(procs) - tree0, cpu_seconds([xsd]) - xsd0, harness_cpu() - own0
        sup = cpu_seconds(procs[:1]) - sup0
        wait_running(dom0, n)
        return {"n": n, "took": took, "tree": tree, "xsd": xsdc, "own": own, "sup": sup, "load": os.getloadavg()[0], **phases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("guests", type=int, nargs="+")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="guests enumerating at once")
    a = ap.parse_args()
    raise_nofile()
    for _ in range(a.runs):
        for n in a.guests:
            r = measure(n, a.in_flight)
            phases = " ".join(f"{k} {r[k]:.1f}" for k in r if k.startswith("t_"))
            print(f"{n:4d} guests: bring-up {r['took']:.1f} s ({phases}); CPU: daemon tree {r['tree']:.1f} s "
                  f"(supervisor {r['sup']:.1f} s), "
                  f"oxenstored {r['xsd']:.1f} s, harness {r['own']:.1f} s; load {r['load']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
