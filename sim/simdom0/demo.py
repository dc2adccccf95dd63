"""``simdom0 demo``: the simulated dom0 end to end.

Starts a private oxenstored, the simulated PCI host, the daemon and N guest
processes (each with one or two simulated devices built from real dumps);
every guest prints the devices it enumerates through its pcifront, and the
demo ends with ``pcibackctl status``.  Exit 0 when every guest connected and
saw exactly its devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from pcibackd.control.commands import COMMANDS
from pcibackd.wire.bdf import BDF
from simdom0.dom0 import SimDom0
from pcibackd.wire.pciif import XenbusState
from pcibackd.xenstore.toolstack import frontend_path

# (dump, host BDF) pool handed out round-robin; distinct BDFs per device.
_DUMPS = ["edu", "pci-testdev", "e1000e", "nvme", "rtl8139", "virtio-net", "intel-hda", "megasas-gen2"]


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


def run_demo(guests: int, duration: float, hotplug: bool = False, log_level: str = "WARNING") -> int:
    if guests < 1 or guests > 64:
        print("simdom0 demo: --guests must be 1..64", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    with SimDom0(log_level=log_level) as dom0:
        try:
            print(f"simdom0 demo: {guests} guest(s), private xenstored, simulated dom0 in {dom0.dir}")
            dom0.start()
            layout = plan(guests)
            for domid, devs in layout.items():
                for dump, bdf in devs:
                    dom0.add_device(dump, bdf)
                dom0.create_guest(domid, [bdf for _, bdf in devs])
                print(f"  toolstack: dom{domid} <- " + ", ".join(f"{bdf} ({dump})" for dump, bdf in devs))
            summaries: dict = {}
            readers = []
            for domid in layout:
                p = subprocess.Popen(
                    [sys.executable, "-m", "simdom0.guest", "--sim-dir", str(dom0.sim_dir),
                     "--xenstored-path", dom0.xenstored.socket_path, "--domid", str(domid),
                     "--duration", str(duration)] + (["--until-closed"] if hotplug else ["--lspci"]),
                    stdout=subprocess.PIPE, text=True, env=dom0._env())
                procs.append(p)
                readers.append(_reader(p, summaries))
            expected = {d: len(devs) for d, devs in layout.items()}
            if hotplug:
                _wait_connected(dom0, layout)
                expected = hotplug_round(dom0, layout, 3)
                time.sleep(duration)          # let the guests run traffic on the new layout
            if hotplug:
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
                    print(f"dom{domid}: FAILED: saw {s.get('changes', 0)} hot-plug changes, expected 2",
                          file=sys.stderr)
            print()
            # "gone": ops that met a device on its way out, answered dev_not_found
            # exactly as Linux pciback answers them: expected, not errors.
            print("guest-side: " + ", ".join(f"dom{d}: {s['ops']} ops {s['errors']} errors"
                                            + (f" ({s['gone']} on a leaving device)" if s.get("gone") else "")
                                            for d, s in sorted(summaries.items())))
            print("demo " + ("OK: every guest connected and saw its devices" + (" change live" if hotplug else "")
                             if ok else "FAILED"))
            return 0 if ok else 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
