"""Scale and chaos on one simulated dom0 (real oxenstored, one simulated edu device per guest).

Table (per guest count):
  idle CPU        daemon tree (supervisor + fork server + workers) and the supervisor
                  alone, % of one core, frontends connected, no guest traffic
  bring-up        toolstack writes for every guest -> every frontend Connected
  supervisor      RSS and open fds
  status p99      `pcibackctl status` request round trip (client.call)
  worker USS      median over a few workers

Chaos (one run): kill -9 a random worker every --chaos-every s across
--chaos-targets guests while every guest's frontend issues conf_reads; one
more guest's own op crashes its worker every time (failpoint op-crash-loop).
Prints ops lost (the frontend timed out: Linux pcifront's 2 s), the guests
that went FATAL (only the crash-looping one should), and the bystanders' op
p99 under chaos against a no-chaos baseline of the same run.

    python bench/scale.py                       # 64 guests, 20 s chaos: ~2.5 min on 2 busy cores
    python bench/scale.py --full                # 64/128/256 guests, 60 s chaos: ~6 min
    python bench/scale.py --guests 128 --no-chaos
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import select
import signal
import statistics
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import psutil

from pcibackd.control.client import call
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import Op
from simdom0.dom0 import SimDom0

G0 = BDF(0, 0, 0, 0)
# Guests enumerating at once (enumerate_together): 1 on 2 busy cores, where overlapping
# more guests only adds wake-ups; more shows the overlap guests booting together have.
IN_FLIGHT = 1
BEGIN_AT_ONCE = 16        # guests beginning their handshake together (threads of this harness)
CRASH_OFFSET = 0xFC       # worker/faults.py TRIGGER_OFFSET


def raise_nofile() -> None:
    """The harness holds several fds per simulated guest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bdf_of(i: int) -> str:
    return f"0000:{0x10 + i // 32:02x}:{i % 32:02x}.0"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def daemon_tree(dom0: SimDom0) -> list[psutil.Process]:
    p = psutil.Process(dom0.daemon.pid)
    return [p, *p.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_running(dom0: SimDom0, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        guests = dom0.status(timeout=30)["guests"]
        running = sum(g["worker_state"] == "RUNNING" and g["connected"] for g in guests)
        if running == n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {running}/{n} guests running after {timeout} s:\n{dom0.log_tail()}")
        time.sleep(0.2)        # polling a condition with a deadline


def enumerate_together(fronts, answers, in_flight: int = IN_FLIGHT, timeout: float = 300.0) -> None:
    """Every guest's enumeration (PCIFront.scan_steps) at once, as guests booting together run
    theirs on their own CPUs; one process plays them all, with ``in_flight`` guests' ops
    outstanding.  Each guest says Connected when its own enumeration is done."""
    todo = deque(zip(fronts, answers))
    active: dict[int, tuple] = {}        # event-channel fd -> (front, backend state, steps)
    poller = select.poll()
    deadline = time.monotonic() + timeout

    def advance(front, be, steps, answer) -> bool:
        try:
            bdf, offset = steps.send(answer)
        except StopIteration as done:
            front.devices = done.value
            front.connected(be)
            return False
        front.post(Op.conf_read, bdf.domain, bdf.bus, bdf.devfn, offset, 4)
        return True
    while todo or active:
        while todo and len(active) < in_flight:
            front, be = todo.popleft()
            steps = front.scan_steps()
            if advance(front, be, steps, None):
                fd = front.evtchn.fileno()
                active[fd] = (front, be, steps)
                poller.register(fd, select.POLLIN)
        ready = poller.poll(1000)
        if not ready and time.monotonic() > deadline:
            raise TimeoutError(f"{len(active) + len(todo)} guests still enumerating after {timeout} s")
        for fd, _ in ready:
            front, be, steps = active[fd]
            answer = front.answered()
            if answer is not None and not advance(front, be, steps, answer):
                poller.unregister(fd)
                del active[fd]


def bring_up(dom0: SimDom0, n: int, first_domid: int = 1, phases: dict | None = None,
             in_flight: int = IN_FLIGHT) -> tuple[float, list]:
    """Create ``n`` guests and connect their frontends; (seconds, frontends).
    ``phases`` gets the harness's phases (t_write, t_fronts, t_begin, t_wait, t_scan), in seconds."""
    for i in range(n):
        dom0.add_device("edu", bdf_of(i))
    t0 = time.monotonic()
    marks = [t0]
    for i in range(n):
        dom0.create_guest(first_domid + i, [bdf_of(i)])
    marks.append(time.monotonic())
    fronts = [dom0.frontend(first_domid + i) for i in range(n)]
    marks.append(time.monotonic())
    # Every guest's handshake at once, as a host booting guests has them: each guest has its
    # own xenstore connection, so BEGIN_AT_ONCE of them wait on xenstored together.
    with ThreadPoolExecutor(BEGIN_AT_ONCE) as pool:
        list(pool.map(lambda f: f.begin_connect(), fronts))
    marks.append(time.monotonic())
    waited, answers = 0.0, []
    for f in fronts:
        t = time.monotonic()
        answers.append(f.backend_answer(timeout=300))    # the backend's answer (Connected)...
        waited += time.monotonic() - t
    enumerate_together(fronts, answers, in_flight)      # ...then each guest's own enumeration
    end = time.monotonic()
    if phases is not None:
        phases.update(t_write=marks[1] - marks[0], t_fronts=marks[2] - marks[1], t_begin=marks[3] - marks[2],
                      t_wait=waited, t_scan=end - marks[3] - waited)
    return end - t0, fronts


def measure_scale(n: int, idle_seconds: float, status_calls: int) -> dict:
    with SimDom0(log_level="WARNING") as dom0:
        dom0.start()
        xsd = psutil.Process(dom0.xenstored.pid)
        tree0, xsd0 = cpu_seconds(daemon_tree(dom0)), cpu_seconds([xsd, *xsd.children(recursive=True)])
        bring, fronts = bring_up(dom0, n)
        wait_running(dom0, n)
        bring_cpu = cpu_seconds(daemon_tree(dom0)) - tree0
        bring_xsd = cpu_seconds([xsd, *xsd.children(recursive=True)]) - xsd0
        time.sleep(2.0)       # let the bring-up's last reports settle before measuring idle
        procs = daemon_tree(dom0)
        sup = procs[0]
        t0, c0, s0 = time.monotonic(), cpu_seconds(procs), cpu_seconds([sup])
        time.sleep(idle_seconds)         # the measurement window itself
        wall = time.monotonic() - t0
        idle_tree = (cpu_seconds(procs) - c0) / wall * 100
        idle_sup = (cpu_seconds([sup]) - s0) / wall * 100
        rss = sup.memory_info().rss / 2 ** 20
        fds = sup.num_fds()
        rt = str(dom0.runtime)
        lat = []
        s_cpu0 = cpu_seconds([sup])
        for _ in range(status_calls):
            t = time.perf_counter()
            rep = call(rt, "status", timeout=30)
            lat.append((time.perf_counter() - t) * 1000)
            assert rep["status"] == "ok" and len(rep["result"]["guests"]) == n
        status_cpu = (cpu_seconds([sup]) - s_cpu0) / status_calls * 1000
        uss = []
        for p in random.sample(procs[2:], min(5, len(procs) - 2)):
            try:
                uss.append(p.memory_full_info().uss / 2 ** 20)
            except psutil.Error:
                pass
        assert all(f.conf_read(G0, 0, 4) == (0, 0x11E81234) for f in fronts[:4])
        return {"guests": n, "idle_tree": idle_tree, "idle_sup": idle_sup, "bring_up": bring, "rss": rss,
                "fds": fds, "status_p99": pct(lat, 99), "uss": statistics.median(uss) if uss else float("nan"),
                "bring_cpu": bring_cpu, "bring_xsd": bring_xsd, "status_p50": pct(lat, 50), "status_cpu": status_cpu,
                "load": os.getloadavg()[0]}


def op_loop(front, stop: threading.Event, lat: list, offset: int = 0) -> None:
    """Back-to-back conf_reads with a short pause (a guest doing config accesses)."""
    op = front.op
    while not stop.is_set():
        t = time.perf_counter()
        op(Op.conf_read, 0, 0, 0, offset, 4)
        lat.append((time.perf_counter() - t) * 1000)
        stop.wait(0.01)


def run_phase(fronts, seconds: float, chaos=None, crasher=None) -> list[list[float]]:
    """Every front issues ops for ``seconds``; ``crasher`` issues the op that crashes its worker."""
    stop = threading.Event()
    lats = [[] for _ in fronts]
    threads = [threading.Thread(target=op_loop, args=(f, stop, lat), daemon=True) for f, lat in zip(fronts, lats)]
    if crasher is not None:
        threads.append(threading.Thread(target=op_loop, args=(crasher, stop, [], CRASH_OFFSET), daemon=True))
    for t in threads:
        t.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if chaos:
            chaos()
        stop.wait(0.1 if chaos else end - time.monotonic())
    stop.set()
    for t in threads:
        t.join(10)
    return lats


def measure_chaos(n: int, targets: int, seconds: float, every: float) -> dict:
    bad = n + 1          # the guest whose own op crashes its worker, every time
    with SimDom0(log_level="WARNING", env={"PCIBACKD_FAILPOINTS": f"op-crash-loop@{bad}"}) as dom0:
        dom0.start()
        _, fronts = bring_up(dom0, n + 1)
        wait_running(dom0, n + 1)
        fronts, bad_front = fronts[:n], fronts[n]
        victims, bystanders = list(range(1, targets + 1)), list(range(targets, n))
        base = run_phase([fronts[i] for i in bystanders], min(10.0, seconds))
        before = sum(f.timeouts for f in fronts)
        pids = {}
        kills = [0]

        def chaos():
            domid = random.choice(victims)
            g = pids.get(domid)
            if g is None or kills[0] % 10 == 0:        # refresh the pid map now and then
                pids.update({g["domid"]: g["pid"] for g in dom0.status(timeout=30)["guests"] if g["pid"]})
            pid = pids.pop(domid, None)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills[0] += 1
                except ProcessLookupError:
                    pass

        bad_front.op_timeout = 0.5
        started = time.monotonic()
        lats = run_phase(fronts, seconds, chaos, crasher=bad_front)
        took = time.monotonic() - started
        lost = sum(f.timeouts for f in fronts) - before
        total = sum(len(x) for x in lats)
        time.sleep(2.0)       # the last kills' restarts
        guests = dom0.status(timeout=30)["guests"]
        fatal = sorted(g["domid"] for g in guests if g["worker_state"] == "FATAL")
        by_base = [v for i in range(len(bystanders)) for v in base[i]]
        by_chaos = [v for i in bystanders for v in lats[i]]
        return {"guests": n, "targets": targets, "seconds": took, "kills": kills[0], "ops": total, "lost": lost,
                "fatal": fatal, "bad": bad, "base_p99": pct(by_base, 99), "chaos_p99": pct(by_chaos, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, nargs="*", default=None, help="guest counts (default 64; --full: 64 128 256)")
    ap.add_argument("--full", action="store_true", help="64/128/256 guests and a 60 s chaos")
    ap.add_argument("--idle-seconds", type=float, default=40.0, help="idle CPU window (>= the 20 s keepalive)")
    ap.add_argument("--status-calls", type=int, default=50)
    ap.add_argument("--no-chaos", action="store_true")
    ap.add_argument("--chaos-guests", type=int, default=64)
    ap.add_argument("--chaos-targets", type=int, default=48)
    ap.add_argument("--chaos-seconds", type=float, default=None, help="default 20 (--full: 60)")
    ap.add_argument("--chaos-every", type=float, default=0.1)
    a = ap.parse_args()
    raise_nofile()
    counts = a.guests or ([64, 128, 256] if a.full else [64])
    t_start = time.monotonic()
    print(f"bench/scale: {os.cpu_count()} CPUs, idle window {a.idle_seconds:.0f} s")
    rows = [measure_scale(n, a.idle_seconds, a.status_calls) for n in counts]
    print(f"\n| figure | {' | '.join(str(r['guests']) + ' guests' for r in rows)} | target |")
    print(f"|---|{'---|' * len(rows)}---|")
    for label, key, fmt, target in (
            ("idle CPU of the daemon tree, % of one core", "idle_tree", "{:.1f} %", "<= 2 % at 256"),
            ("...of which the supervisor", "idle_sup", "{:.1f} %", ""),
            ("toolstack writes -> all frontends Connected", "bring_up", "{:.1f} s", "<= 10 s at 256"),
            ("...CPU it took: daemon tree / oxenstored", ("bring_cpu", "bring_xsd"), "{:.1f} s / {:.1f} s", "(info)"),
            ("supervisor RSS", "rss", "{:.0f} MB", "<= 64 MB"),
            ("supervisor open fds", "fds", "{}", "well under 1024 at 256"),
            ("pcibackctl status p99", "status_p99", "{:.0f} ms", "<= 100 ms at 256"),
            ("...p50, and supervisor CPU per call", ("status_p50", "status_cpu"), "{:.0f} ms, {:.1f} ms", "(info)"),
            ("worker USS (median of 5)", "uss", "{:.1f} MB", "<= 8 MB"),
            ("machine load average (1 min) at the end", "load", "{:.1f}", "(info: other work on the box)")):
        keys = key if isinstance(key, tuple) else (key,)
        print(f"| {label} | {' | '.join(fmt.format(*(r[k] for k in keys)) for r in rows)} | {target} |")
    if not a.no_chaos:
        seconds = a.chaos_seconds or (60.0 if a.full else 20.0)
        c = measure_chaos(a.chaos_guests, a.chaos_targets, seconds, a.chaos_every)
        ratio = c["chaos_p99"] / c["base_p99"] if c["base_p99"] else float("nan")
        print(f"\nchaos: kill -9 of a random worker every {a.chaos_every * 1000:.0f} ms across {c['targets']} of "
              f"{c['guests']} guests for {c['seconds']:.0f} s ({c['kills']} kills), guest {c['bad']} crash-looping "
              "on its own op")
        print(f"  ops {c['ops']}, lost (frontend timed out) {c['lost']}")
        print(f"  FATAL guests {c['fatal']} (expected [{c['bad']}])")
        print(f"  bystander op p99 {c['chaos_p99']:.2f} ms vs {c['base_p99']:.2f} ms without chaos: x{ratio:.1f}")
    print(f"\nbench/scale took {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
