"""``python -m simdom0 demo``: the daemon on a simulated dom0 (what ``./dev demo`` runs)."""

from __future__ import annotations

import argparse
import sys

from simdom0.demo import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simdom0", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="simulated dom0 demo (private xenstored, simulated guests)",
                       description="Start a private oxenstored, the simulated platform, the daemon and N "
                                   "simulated guests; each guest enumerates its devices through pcibackd.")
    p.add_argument("--guests", type=int, default=4, help="number of guests, 1..64 (default 4)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of config traffic per guest (default 2)")
    p.add_argument("--hotplug", action="store_true", help="also hot-plug and unplug devices while guests run")
    p.add_argument("--log-level", default="WARNING", help="daemon log level (default WARNING)")
    args = parser.parse_args(argv)
    return run_demo(args.guests, args.duration, args.hotplug, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
