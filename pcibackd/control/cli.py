"""pcibackctl: ask a running pcibackd about its guests, and steer it.

Talks to ipc://<runtime-dir>/control.sock (root only), or to a TCP endpoint
with CURVE keys (--endpoint tcp://HOST:PORT --curve-dir DIR).

exit codes:
  0  ok
  1  the daemon could not do it (command failed, or a worker did not answer)
  2  usage error (bad command line, or a request the daemon rejected)
  3  pcibackd is not running
  4  permission denied (not root, or this CURVE key is not allowed)
  5  the daemon did not answer in time
  6  no such guest or device
  7  the daemon is busy (too many requests waiting for workers)

Errors name their cause symbolically (NOT_FOUND, TIMEOUT ...); with --json they
are printed on stdout as {"error": {"name": ..., "errno": ..., "reason": ...,
"exit_code": ...}} as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pcibackd import __version__
from pcibackd.control.client import DaemonUnreachable, call
from pcibackd.control.commands import COMMANDS
from pcibackd.control import create as create_cmd
from pcibackd.control.curve import CurveError, keygen
from pcibackd.control.protocol import Errno

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_BUSY = 0, 1, 2, 6, 7
ERRNO_EXIT = {
    Errno.OK: EXIT_OK, Errno.COMMAND_FAILED: EXIT_FAILED, Errno.TIMEOUT: EXIT_FAILED,
    Errno.INVALID_JSON: EXIT_USAGE, Errno.UNKNOWN_COMMAND: EXIT_USAGE, Errno.BAD_ARGUMENTS: EXIT_USAGE,
    Errno.BAD_MESSAGE: EXIT_USAGE, Errno.NOT_FOUND: EXIT_NOT_FOUND, Errno.BUSY: EXIT_BUSY,
}
RAW = argparse.RawDescriptionHelpFormatter


def _add_command(sub, cmd, common) -> None:
    """``cmd`` under its CLI words (``policy reload`` nests a second level)."""
    for word in cmd.words[:-1]:
        group = sub.choices.get(word) or sub.add_parser(word, help=f"{word} commands", formatter_class=RAW)
        if group._subparsers is None:
            group.add_subparsers(dest=f"{word}_command", required=True, metavar="COMMAND")
        sub = group._subparsers._group_actions[0]
    p = sub.add_parser(cmd.words[-1], help=cmd.short, description=cmd.doc, formatter_class=RAW,
                       parents=[common])
    for a in cmd.args:
        if a.type is bool:
            p.add_argument(*(a.flags or (f"--{a.name}",)), dest=f"arg_{a.name}", action="store_true", help=a.help)
        elif a.flags:
            p.add_argument(*a.flags, dest=f"arg_{a.name}", type=a.type, default=a.type(), help=a.help,
                           metavar=a.metavar or a.name)
        else:
            p.add_argument(f"arg_{a.name}", type=a.type, choices=a.choices, help=a.help, metavar=a.metavar or a.name)
    p.set_defaults(command=cmd.name)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result as JSON (for scripts)")
    parser = argparse.ArgumentParser(prog="pcibackctl", description=__doc__, formatter_class=RAW)
    parser.add_argument("--version", action="version", version=f"pcibackctl {__version__}")
    parser.add_argument("--runtime-dir", default="/run/pcibackd", help="the daemon's runtime dir (default %(default)s)")
    parser.add_argument("--endpoint", help="tcp://HOST:PORT of a daemon with control_tcp set (needs --curve-dir)")
    parser.add_argument("--curve-dir", help="server.key and client.key_secret for --endpoint")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        _add_command(sub, cmd, common)
    kg = sub.add_parser("keygen", help="write a CURVE key pair for the TCP endpoint (local; no daemon)",
                        description="Write NAME.key (public) and NAME.key_secret (0600) into DIR.\n"
                                    "Daemon: NAME=server in control_curve_dir; allow a client by copying its\n"
                                    "NAME.key into control_curve_dir/clients/ (read when the daemon starts).\n"
                                    "Client: --curve-dir holds the daemon's server.key and its own client.key_secret.",
                        formatter_class=RAW)
    kg.add_argument("dir")
    kg.add_argument("name")
    kg.set_defaults(command="keygen")
    cr = sub.add_parser("create", help="xl create with pci=[...]: create paused, attach through pcibackd, unpause",
                        description=create_cmd.__doc__,
                        formatter_class=RAW)
    cr.add_argument("--xl", default=os.environ.get("PCIBACKD_XL", "xl"), help="the xl to run (default xl)")
    cr.add_argument("cfg", metavar="CFG", help="the xl domain config")
    cr.add_argument("xl_opts", nargs=argparse.REMAINDER, metavar="...", help="more xl create options")
    cr.set_defaults(command="create")
    return parser


def errno_name(errno) -> str:
    """The control protocol's error number by name (it is not a POSIX errno)."""
    try:
        return Errno(errno).name
    except (ValueError, TypeError):
        return f"ERROR_{errno}"


def _fail(as_json: bool, name: str, errno: int | None, reason: str, exit_code: int, text: str) -> int:
    """Report a failure: a line on stderr, and with --json an error object on stdout."""
    if as_json:
        print(json.dumps({"error": {"name": name, "errno": errno, "reason": reason, "exit_code": exit_code}},
                         indent=2, sort_keys=True))
    print(f"pcibackctl: {text}", file=sys.stderr)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "keygen":
        for path in keygen(ns.dir, ns.name):
            print(path)
        return EXIT_OK
    if ns.endpoint and not ns.endpoint.startswith("ipc://") and not ns.curve_dir:
        parser.error("a TCP endpoint needs --curve-dir (the daemon speaks CURVE only on TCP)")

    def daemon(name: str, args: dict) -> dict:
        return call(ns.runtime_dir, name, args, ns.timeout, endpoint=ns.endpoint, curve_dir=ns.curve_dir)
    try:
        if ns.command == "create":
            return create_cmd.create(ns.cfg, ns.xl_opts, daemon, xl=ns.xl)
        cmd = COMMANDS[ns.command]
        rep = daemon(cmd.name, {a.name: getattr(ns, f"arg_{a.name}") for a in cmd.args})
        if rep.get("status") == "ok" and cmd.follow is not None and (why := cmd.follow(rep["result"], daemon, ns.timeout)):
            print(f"pcibackctl: {why}", file=sys.stderr)
            return EXIT_FAILED
    except DaemonUnreachable as exc:
        return _fail(ns.json, exc.name, None, str(exc), exc.exit_code, str(exc))
    except CurveError as exc:
        return _fail(ns.json, "CURVE_KEYS", None, str(exc), EXIT_USAGE, str(exc))
    if rep.get("status") != "ok":
        errno, reason = rep.get("errno"), str(rep.get("reason"))
        name = errno_name(errno)
        return _fail(ns.json, name, errno, reason, ERRNO_EXIT.get(errno, EXIT_FAILED),
                     f"{' '.join(cmd.words)}: {reason} ({name})")
    if ns.json:
        print(json.dumps(rep["result"], indent=2, sort_keys=True))
    else:
        try:
            out = cmd.render(rep["result"])
        except RuntimeError as exc:       # e.g. an optional library the command needs is missing
            return _fail(False, "UNAVAILABLE", None, str(exc), EXIT_FAILED, str(exc))
        print(out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
