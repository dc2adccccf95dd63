"""A simulated guest process: connect through pcifront, print what it sees,
then generate config-space traffic until told to stop.

    python -m simdom0.guest --sim-dir D --xenstored-path S --domid N [--duration S]

Prints ``domN: <lspci line>`` per device, ``domN: +/- <line>`` on hot-plug
changes, and a last line ``domN: summary {json}``.  In the summary, ``gone``
counts ops on a device that was leaving, answered ``dev_not_found`` as Linux
pciback answers them; ``errors`` counts every other failed op.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time

from pcibackd.wire.pciif import Err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sim-dir", required=True)
    p.add_argument("--xenstored-path", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--duration", type=float, default=2.0, help="seconds of traffic after connecting")
    p.add_argument("--until-closed", action="store_true", help="keep following xenbus until the backend closes")
    p.add_argument("--lspci", action="store_true", help="print lspci -vvv of each device as this guest sees it")
    p.add_argument("--hold", action="store_true", help="after the traffic, stay connected (idle) until SIGTERM")
    args = p.parse_args(argv)
    from simdom0.platform import SimPlatform
    from pcibackd.xenstore.client import XenStore
    from simdom0.pcifront import PCIFront

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(now=True))
    tag = f"dom{args.domid}"
    xs = XenStore(args.xenstored_path)
    front = PCIFront(xs, SimPlatform(args.sim_dir, args.domid), args.domid)
    summary = {"domid": args.domid, "connected": False, "devices": [], "ops": 0, "errors": 0, "gone": 0,
               "timeouts": 0, "changes": 0, "max_seen": 0}
    try:
        devices = front.connect()
        summary["connected"] = True
        for d in devices:
            print(f"{tag}: {d.lspci_line()}", flush=True)
        summary["max_seen"] = len(devices)
        if args.lspci:
            from simdom0.lspci import lspci_vvv
            for d in devices:
                text = lspci_vvv(front.config_dump(d.bdf), d.bdf)
                print("\n".join(f"{tag}:   {line}" for line in text.rstrip().splitlines()), flush=True)
        deadline = time.monotonic() + args.duration
        rng = random.Random(args.domid)
        while not stop["now"] and (time.monotonic() < deadline or args.until_closed):
            # Without devices there is nothing to do but wait for xenbus.
            for change in front.follow(timeout=0.0 if front.devices else 0.05):
                print(f"{tag}: {change}", flush=True)
                summary["changes"] += 1
            summary["max_seen"] = max(summary["max_seen"], len(front.devices))
            if front.page is None:
                break
            for d in front.devices:
                err, _ = front.conf_read(d.bdf, rng.randrange(0, 64, 4), 4)
                summary["ops"] += 1
                if err == Err.dev_not_found and front.leaving(d.bdf):
                    summary["gone"] += 1
                elif err != Err.success:
                    summary["errors"] += 1
        while args.hold and not stop["now"] and front.page is not None:
            for change in front.follow(timeout=0.5):
                print(f"{tag}: {change}", flush=True)
        summary["devices"] = [d.lspci_line() for d in front.devices]
        summary["state"] = front.state()
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        summary["timeouts"] = front.timeouts
        print(f"{tag}: summary {json.dumps(summary)}", flush=True)
        front.close()
        xs.close()
    return 0 if summary["connected"] and "error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
