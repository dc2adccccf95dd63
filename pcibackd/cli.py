"""``pcibackd``: the daemon's command line (``pcibackd run``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import zmq

from pcibackd import __version__
from pcibackd.common import logs
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import ENDPOINT_NAME
from pcibackd.control.server import ControlServer, ControlSetupError
from pcibackd.daemon.arbiter import Supervisor
from pcibackd.daemon.config import DaemonConfig
from pcibackd.platform.api import PlatformError
from pcibackd.platform.select import NotADom0, default_spec

EPILOG = """\
examples:
  pcibackd run                       serve guests on this Xen dom0 (systemd: Type=notify)
  pcibackd run --config /etc/pcibackd/pcibackd.toml --log-level DEBUG

Without Xen there is nothing to serve: the simulated dom0 that the demo, the
tests and the benchmarks use lives in the source tree (./dev demo).
"""


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground",
                       description="Watch xenstore for PCI backends and serve each guest from its own worker.")
    p.add_argument("--config", help="TOML config (default /etc/pcibackd/pcibackd.toml if present)")
    p.add_argument("--platform", metavar="SPEC",
                   help="xen (the default on a Xen dom0), or sim:DIR for the simulated dom0 of a checkout")
    p.add_argument("--xenstored-path", help="xenstored socket (default: $XENSTORED_PATH or the system one)")
    p.add_argument("--runtime-dir", help="control socket and claims (default /run/pcibackd)")
    p.add_argument("--topology", choices=("vpci", "passthrough"), help="guest PCI topology (default vpci)")
    p.add_argument("--poll-window-us", type=float, help="busy-poll window after each op (default 50)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    p.add_argument("--heartbeat-timeout", type=float,
                   help="kill and replace a worker silent this long, seconds (default 1.0; raise on slow emulators)")
    p.add_argument("--foreground", action="store_true", help="accepted for compatibility; always foreground")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcibackd", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pcibackd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    args = parser.parse_args(argv)
    return _run(args, parser)


def control_opener(cfg: DaemonConfig):
    """How the supervisor makes its control endpoint, once its ZeroMQ context
    exists (the daemon package does not know the control package)."""
    def open_control(zctx: zmq.Context, face: DaemonFace) -> ControlServer:
        return ControlServer(zctx, Path(cfg.runtime_dir) / ENDPOINT_NAME, face,
                             tcp=cfg.control_tcp, curve_dir=cfg.control_curve_dir,
                             status_group=cfg.status_group)
    return open_control


def _run(args, parser) -> int:
    try:
        cfg = DaemonConfig.load(args.config, platform=args.platform,
                                xenstored_path=args.xenstored_path, runtime_dir=args.runtime_dir,
                                topology=args.topology, poll_window_us=args.poll_window_us,
                                log_level=args.log_level, heartbeat_timeout=args.heartbeat_timeout)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        cfg.platform = cfg.platform or default_spec()
        supervisor = Supervisor(cfg, control_opener(cfg))
    except NotADom0 as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    except PlatformError as exc:
        print(f"pcibackd: {exc.strerror or exc}", file=sys.stderr)      # the errno is no news to an admin
        return 1
    except ValueError as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    logs.setup(cfg.log_level)
    try:
        return supervisor.run()
    except ControlSetupError as exc:
        print(f"pcibackd: control socket: {exc}", file=sys.stderr)
    except (ConnectionError, FileNotFoundError, TimeoutError) as exc:
        where = cfg.xenstored_path or "the default xenstored socket (or $XENSTORED_PATH)"
        print(f"pcibackd: cannot reach xenstored at {where}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
