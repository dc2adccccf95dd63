"""``pcibackctl``: ask a running pcibackd about its guests, and steer it.

exit codes: 0 ok, 1 the command failed, 2 usage error, 3 daemon not reachable
"""

from __future__ import annotations

import argparse
import json
import sys

from .client import DaemonUnreachable, call
from .commands import COMMANDS
from .render import RENDERERS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcibackctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-dir", default="/run/pcibackd", help="daemon runtime dir (default /run/pcibackd)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, spec) in COMMANDS.items():
        p = sub.add_parser(name, help=handler.__doc__.splitlines()[0], description=handler.__doc__)
        for arg, typ in spec.items():
            p.add_argument(arg, type=typ)
    args = parser.parse_args(argv)
    spec = COMMANDS[args.command][1]
    try:
        rep = call(args.runtime_dir, args.command, {k: getattr(args, k) for k in spec}, args.timeout)
    except DaemonUnreachable as exc:
        print(f"pcibackctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if rep["status"] != "ok":
        print(f"pcibackctl: {args.command}: {rep['reason']} (errno {rep['errno']})", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(rep["result"], indent=2, sort_keys=True))
    else:
        print(RENDERERS.get(args.command, lambda r: json.dumps(r, indent=2))(rep["result"]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
