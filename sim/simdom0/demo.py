"""``simdom0 demo``: the simulated dom0 end to end.

Starts a private oxenstored, the simulated PCI host, the daemon and N guest
processes (each with one or two simulated devices built from real dumps);
every guest lists the devices it enumerates through its pcifront (``lspci
-vvv`` with ``lspci=True``), and the demo ends with a summary per guest and
``pcibackctl status``.  Exit 0 when every guest connected and saw exactly its
devices.  With ``keep_running`` everything stays up (guests idle) until
Ctrl-C or SIGTERM, for trying ``pcibackctl`` by hand.

SIGINT and SIGTERM both stop everything the demo started (guests, daemon,
workers, xenstored) and remove its directory; exit 130 / 143.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from pcibackd.control.commands import COMMANDS
from pcibackd.wire.bdf import BDF
from pcibackd.wire.pciif import XenbusState
from pcibackd.xenstore.toolstack import frontend_path
from simdom0.dom0 import SimDom0

# (dump, host BDF) pool handed out round-robin; distinct BDFs per device.
_DUMPS = ["edu", "pci-testdev", "e1000e", "nvme", "rtl8139", "virtio-net", "intel-hda", "megasas-gen2"]
MAX_GUESTS = 64
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def plan(guests: int) -> dict[int, list[tuple[str, BDF]]]:
    """Devices per guest domid: guest i gets 1 or 2 devices."""
    out, k = {}, 0
    for i in range(guests):
        devs = []
        for _ in range(1 + i % 2):
            devs.append((_DUMPS[k % len(_DUMPS)], BDF(0, 1 + k // 32, k % 32, 0)))
            k += 1
        out[i + 1] = devs
    return out


def _reader(proc: subprocess.Popen, summaries: dict) -> threading.Thread:
    """Print a guest's lines as they come; keep its summary."""
    def run():
        for line in proc.stdout:
            if " summary " in line:
                s = json.loads(line.split(" summary ", 1)[1])
                summaries[s["domid"]] = s
            else:
                print("  " + line.rstrip(), flush=True)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_connected(dom0: SimDom0, domids, timeout: float = 30.0) -> None:
    """Until both ends are Connected: the backend is as soon as it maps the
    page, the guest only after it enumerated; a hot-plug before that would
    race the guest's first scan."""
    deadline = time.monotonic() + timeout
    while True:
        st = {g["domid"]: g for g in dom0.status()["guests"]}
        if all(st.get(d, {}).get("xenbus_state") == XenbusState.Connected
               and dom0.xs.read(frontend_path(d) + "/state") == str(int(XenbusState.Connected))
               for d in domids):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"guests did not connect in {timeout} s")
        time.sleep(0.05)


def _wait_beats_settled(dom0: SimDom0, summaries: dict, timeout: float = 5.0) -> None:
    """Until every worker's last beat counts at least the ops its guest made."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = {g["domid"]: sum(g["served"].values()) for g in dom0.status()["guests"]}
        if all(served.get(d, 0) >= s["ops"] for d, s in summaries.items()):
            return
        time.sleep(0.1)


def hotplug_round(dom0: SimDom0, layout: dict, spare_base: int) -> dict[int, list[str]]:
    """Give every guest one more device, then take its first one away."""
    expected = {}
    for domid, devs in layout.items():
        spare = BDF(0, 0x40, domid % 32, 0)
        dump = _DUMPS[(spare_base + domid) % len(_DUMPS)]
        dom0.add_device(dump, spare)
        print(f"  toolstack: hot-plug {spare} ({dump}) into dom{domid}", flush=True)
        dom0.toolstack.attach(domid, spare)
        first = devs[0][1]
        print(f"  toolstack: hot-unplug {first} from dom{domid}", flush=True)
        dom0.toolstack.detach(domid, first)
        expected[domid] = len(devs)
    return expected


def pcibackctl_line(dom0: SimDom0) -> str:
    """The exact command that reaches this demo's daemon."""
    return f"{Path(sys.prefix) / 'bin' / 'pcibackctl'} --runtime-dir {dom0.runtime} status"


def run_demo(guests: int, duration: float, hotplug: bool = False, log_level: str = "WARNING",
             lspci: bool = False, keep_running: bool = False) -> int:
    if not 1 <= guests <= MAX_GUESTS:
        print(f"simdom0 demo: --guests must be 1..{MAX_GUESTS}", file=sys.stderr)
        return 2
    if hotplug and keep_running:
        print("simdom0 demo: --hotplug and --keep-running do not go together", file=sys.stderr)
        return 2
    previous = {s: signal.signal(s, _interrupt) for s in EXIT_SIGNAL}
    dom0 = procs = None
    try:
        dom0 = SimDom0(log_level=log_level)
        procs = []
        return _run(dom0, procs, guests, duration, hotplug, lspci, keep_running)
    except RuntimeError as exc:        # guests did not connect, the daemon stopped answering
        print(f"demo FAILED: {exc}", file=sys.stderr)
        if dom0 is not None:
            print("\n----- pcibackd log (last lines) -----\n" + dom0.log_tail(30), file=sys.stderr)
        return 1
    except Interrupted as exc:
        for s in EXIT_SIGNAL:             # a second Ctrl-C must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        print(f"\ninterrupted ({exc}): stopping everything", file=sys.stderr)
        return 0 if keep_running and dom0 is not None and dom0.daemon is not None else EXIT_SIGNAL[exc.signum]
    finally:
        for s in EXIT_SIGNAL:
            signal.signal(s, signal.SIG_IGN)
        if dom0 is not None:
            _cleanup(dom0, procs or [])
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def _cleanup(dom0: SimDom0, procs: list[subprocess.Popen]) -> None:
    """Guests, daemon, its workers and fork server, xenstored: all gone, the directory removed."""
    for p in procs:                          # SIGTERM: a guest prints its summary and closes
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    tree = []
    if dom0.daemon is not None:
        try:
            tree = psutil.Process(dom0.daemon.pid).children(recursive=True)
        except psutil.Error:
            pass
    dom0.stop()                              # SIGTERM: the daemon stops its workers
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:                          # whatever the daemon could not stop
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _run(dom0: SimDom0, procs: list, guests: int, duration: float, hotplug: bool, lspci: bool,
         keep_running: bool) -> int:
    print(f"simdom0 demo: {guests} guest(s), private xenstored, simulated dom0 in {dom0.dir}")
    try:
        dom0.start()
    except RuntimeError as exc:                # the daemon did not come up: its log says why
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1
    layout = plan(guests)
    for domid, devs in layout.items():
        for dump, bdf in devs:
            dom0.add_device(dump, bdf)
        dom0.create_guest(domid, [bdf for _, bdf in devs])
        print(f"  toolstack: dom{domid} <- " + ", ".join(f"{bdf} ({dump})" for dump, bdf in devs))
    summaries: dict = {}
    readers = []
    mode = ["--until-closed"] if hotplug else ["--hold"] if keep_running else []
    for domid in layout:
        p = subprocess.Popen(
            [sys.executable, "-m", "simdom0.guest", "--sim-dir", str(dom0.sim_dir),
             "--xenstored-path", dom0.xenstored.socket_path, "--domid", str(domid),
             "--duration", str(duration), *mode, *(["--lspci"] if lspci else [])],
            stdout=subprocess.PIPE, text=True, env=dom0._env(),
            start_new_session=True)           # Ctrl-C reaches the demo only; it stops the guests
        procs.append(p)
        readers.append(_reader(p, summaries))
    expected = {d: len(devs) for d, devs in layout.items()}
    if keep_running:
        _wait_connected(dom0, layout)
        print(f"\npcibackd serves {guests} guest(s); try, from another terminal:\n\n"
              f"  {pcibackctl_line(dom0)}\n\n"
              f"(daemon log: {dom0.daemon_log})  Ctrl-C stops everything.", flush=True)
        while True:
            signal.pause()
    if hotplug:
        _wait_connected(dom0, layout)
        expected = hotplug_round(dom0, layout, 3)
        time.sleep(duration)          # let the guests run traffic on the new layout
        status = dom0.status()          # before teardown: the guests are still there
        for domid in layout:
            print(f"  toolstack: destroy dom{domid}", flush=True)
            dom0.toolstack.destroy(domid)
    hung = []
    for p in procs:
        try:
            p.wait(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            hung.append(p.args[p.args.index("--domid") + 1])
    if not hotplug:
        _wait_beats_settled(dom0, summaries)
        status = dom0.status()
    for t in readers:
        t.join(5)
    print()
    print(COMMANDS["status"].render(status))
    ok = _judge(summaries, expected, hung, hotplug)
    print()
    _print_summary(summaries)
    if not ok:
        print("\n----- pcibackd log (last lines) -----\n" + dom0.log_tail(30), file=sys.stderr)
    print("demo " + ("OK: every guest connected and saw its devices" + (" change live" if hotplug else "")
                     if ok else "FAILED"))
    return 0 if ok else 1


def _judge(summaries: dict, expected: dict, hung: list, hotplug: bool) -> bool:
    """Whether every guest did what it should; each failure printed."""
    ok = not hung
    if hung:
        print(f"guests {', '.join(hung)} did not finish: killed", file=sys.stderr)
    for domid, n in expected.items():
        s = summaries.get(domid, {})
        seen = len(s.get("devices", [])) if not hotplug else s.get("max_seen", 0)
        if not s.get("connected") or s.get("error") or (not hotplug and seen != n):
            ok = False
            print(f"dom{domid}: FAILED: connected={s.get('connected')} saw {seen}/{n} "
                  f"devices {s.get('error', '')}", file=sys.stderr)
        if s.get("errors"):
            ok = False
            print(f"dom{domid}: FAILED: {s['errors']} ops failed on a device still assigned "
                  f"({s.get('timeouts', 0)} timed out)", file=sys.stderr)
        if hotplug and s.get("changes", 0) < 2:
            ok = False
            print(f"dom{domid}: FAILED: saw {s.get('changes', 0)} hot-plug changes, expected 2", file=sys.stderr)
    return ok


def _print_summary(summaries: dict) -> None:
    """One line per guest, as the guest saw it."""
    # "gone": ops that met a device on its way out, answered dev_not_found
    # exactly as Linux pciback answers them: expected, not errors.
    for d, s in sorted(summaries.items()):
        gone = f" ({s['gone']} on a leaving device)" if s.get("gone") else ""
        print(f"guest dom{d}: {len(s.get('devices', []))} device(s), {s['ops']} ops, {s['errors']} errors{gone}")
