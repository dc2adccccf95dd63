"""``python -m simdom0 demo``: the daemon on a simulated dom0 (what ``./dev demo`` runs)."""

from __future__ import annotations

import argparse
import sys

from simdom0.demo import MAX_GUESTS, run_demo

LIMITS = f"""\
what is simulated, and the limits:
  - everything runs as ordinary processes on this machine: no Xen, no root needed,
    no host device touched; xenstored is a real oxenstored on a private socket
  - guests are PV guests speaking the xen-pcifront protocol (the only kind pcibackd
    serves); devices are built from real config-space dumps (edu, e1000e, nvme, ...)
  - 1..{MAX_GUESTS} guests, each with one or two devices; no DMA, no guest drivers
  - Ctrl-C or SIGTERM stops everything the demo started and removes its directory

examples:
  ./dev demo                           4 guests, 2 s of config traffic each
  ./dev demo --guests 2 --lspci        what each guest's lspci -vvv shows
  ./dev demo --keep-running            stay up and print the pcibackctl line to try
  ./dev demo --hotplug                 hot-plug and unplug devices while guests run
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simdom0", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="simulated dom0 demo (private xenstored, simulated guests)",
                       description="Start a private oxenstored, the simulated platform, the daemon and N "
                                   "simulated guests; each guest enumerates its devices through pcibackd.",
                       epilog=LIMITS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guests", type=int, default=4, help=f"number of guests, 1..{MAX_GUESTS} (default 4)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of config traffic per guest (default 2)")
    p.add_argument("--hotplug", action="store_true", help="also hot-plug and unplug devices while guests run")
    p.add_argument("--lspci", action="store_true", help="print lspci -vvv of each device as its guest sees it")
    p.add_argument("--keep-running", action="store_true",
                   help="after connecting, keep the daemon and guests up until Ctrl-C (try pcibackctl)")
    p.add_argument("--log-level", default="WARNING", help="daemon log level (default WARNING)")
    args = parser.parse_args(argv)
    return run_demo(args.guests, args.duration, args.hotplug, args.log_level, lspci=args.lspci,
                    keep_running=args.keep_running)


if __name__ == "__main__":
    sys.exit(main())
