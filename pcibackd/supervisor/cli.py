"""``pcibackd``: run the daemon, or the self-contained simulated-dom0 demo."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  pcibackd run                       serve guests on this dom0 (systemd: Type=notify)
  pcibackd run --platform sim --sim-dir DIR --xenstored-path SOCK
  pcibackd demo --guests 4 --duration 3
"""


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground",
                       description="Watch xenstore for PCI backends and serve each guest from its own worker.")
    p.add_argument("--config", help="TOML config (default /etc/pcibackd/pcibackd.toml if present)")
    p.add_argument("--platform", choices=("xen", "sim"), help="default: xen when /dev/xen exists, else sim")
    p.add_argument("--sim-dir", help="simulated dom0 state directory (platform sim)")
    p.add_argument("--xenstored-path", help="xenstored socket (default: $XENSTORED_PATH or the system one)")
    p.add_argument("--runtime-dir", help="control socket and claims (default /run/pcibackd)")
    p.add_argument("--topology", choices=("vpci", "passthrough"), help="guest PCI topology (default vpci)")
    p.add_argument("--poll-window-us", type=float, help="busy-poll window after each op (default 50)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    p.add_argument("--heartbeat-timeout", type=float,
                   help="kill and replace a worker silent this long, seconds (default 1.0; raise on slow emulators)")
    p.add_argument("--foreground", action="store_true", help="accepted for compatibility; always foreground")


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="simulated dom0 demo (private xenstored, simulated guests)",
                       description="Start a private oxenstored, the simulated platform, the daemon and N "
                                   "simulated guests; each guest enumerates its devices through pcibackd.")
    p.add_argument("--guests", type=int, default=4, help="number of guests (default 4)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds of config traffic per guest (default 2)")
    p.add_argument("--hotplug", action="store_true", help="also hot-plug and unplug devices while guests run")
    p.add_argument("--log-level", default="WARNING", help="daemon log level (default WARNING)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcibackd", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from ..frontend.demo import run_demo
        return run_demo(args.guests, args.duration, args.hotplug, args.log_level)
    return _run(args, parser)


def _run(args, parser) -> int:
    from .. import logs
    from ..xen.select import default_platform_name
    from .arbiter import Supervisor
    from .config import DaemonConfig
    try:
        cfg = DaemonConfig.load(args.config, platform=args.platform, sim_dir=args.sim_dir,
                                xenstored_path=args.xenstored_path, runtime_dir=args.runtime_dir,
                                topology=args.topology, poll_window_us=args.poll_window_us,
                                log_level=args.log_level, heartbeat_timeout=args.heartbeat_timeout)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    cfg.platform = cfg.platform or default_platform_name()
    if cfg.platform == "sim" and not cfg.sim_dir:
        parser.error("--platform sim needs --sim-dir (or use `pcibackd demo`)")
    logs.setup(cfg.log_level)
    from ..control.server import ControlSetupError
    try:
        return Supervisor(cfg).run()
    except ControlSetupError as exc:
        print(f"pcibackd: control socket: {exc}", file=sys.stderr)
    except (ConnectionError, FileNotFoundError, TimeoutError) as exc:
        where = cfg.xenstored_path or "the default xenstored socket (or $XENSTORED_PATH)"
        print(f"pcibackd: cannot reach xenstored at {where}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
