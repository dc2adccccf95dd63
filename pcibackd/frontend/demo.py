"""``pcibackd demo``: the simulated dom0 end to end.

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
import time

from ..control.render import render_status
from ..pcihost.bdf import BDF
from ..simdom0 import SimDom0

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


def run_demo(guests: int, duration: float, hotplug: bool = False, log_level: str = "WARNING") -> int:
    if guests < 1 or guests > 64:
        print("pcibackd demo: --guests must be 1..64", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    with SimDom0(log_level=log_level) as dom0:
        try:
            print(f"pcibackd demo: {guests} guest(s), private xenstored, simulated dom0 in {dom0.dir}")
            dom0.start()
            layout = plan(guests)
            for domid, devs in layout.items():
                for dump, bdf in devs:
                    dom0.add_device(dump, bdf)
                dom0.create_guest(domid, [bdf for _, bdf in devs])
                print(f"  toolstack: dom{domid} <- " + ", ".join(f"{bdf} ({dump})" for dump, bdf in devs))
            for domid in layout:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pcibackd.frontend.guest", "--sim-dir", str(dom0.sim_dir),
                     "--xenstored-path", dom0.xenstored.socket_path, "--domid", str(domid),
                     "--duration", str(duration)],
                    stdout=subprocess.PIPE, text=True, env=dom0._env()))
            summaries = {}
            for p in procs:
                out, _ = p.communicate(timeout=duration + 60)
                for line in out.splitlines():
                    if " summary " in line:
                        s = json.loads(line.split(" summary ", 1)[1])
                        summaries[s["domid"]] = s
                    else:
                        print("  " + line)
            status = dom0.status()
            print()
            print(render_status(status))
            ok = True
            for domid, devs in layout.items():
                s = summaries.get(domid, {})
                seen = len(s.get("devices", []))
                if not s.get("connected") or seen != len(devs) or s.get("error"):
                    ok = False
                    print(f"dom{domid}: FAILED: connected={s.get('connected')} saw {seen}/{len(devs)} "
                          f"devices {s.get('error', '')}", file=sys.stderr)
            print()
            print("guest-side: " + ", ".join(f"dom{d}: {s['ops']} ops {s['errors']} errors"
                                            for d, s in sorted(summaries.items())))
            print("demo " + ("OK: every guest connected and saw its devices" if ok else "FAILED"))
            return 0 if ok else 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
