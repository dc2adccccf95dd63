"""``pcibackd``: the daemon's command line (``pcibackd run``, ``pcibackd check-config``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq
from loguru import logger

from pcibackd import __version__
from pcibackd.common import logs, proctitle
from pcibackd.confspace import PolicyError, PolicyStore
from pcibackd.control.face import DaemonFace
from pcibackd.control.protocol import ENDPOINT_NAME
from pcibackd.control.server import ControlServer, ControlSetupError
from pcibackd.daemon.arbiter import Supervisor
from pcibackd.daemon.config import DEFAULT_CONFIG, ConfigError, DaemonConfig
from pcibackd.platform.api import PlatformError
from pcibackd.platform.select import NotADom0, default_spec, running_on_xen
from pcibackd.worker import faults

try:
    from pcibackd.control import exposition
except ImportError:                # prometheus_client is an optional extra
    exposition = None

DESCRIPTION = ("Userspace Xen PCI passthrough backend for a dom0: serves the xen-pcifront "
               "protocol of PV guests, one isolated worker process per guest.")
DEMO_HINT = "to try pcibackd without Xen, run the simulated dom0 from a checkout: ./dev demo"
EPILOG = """\
examples:
  pcibackd run                       serve guests on this Xen dom0 (systemd: Type=notify)
  pcibackd run --config /etc/pcibackd/pcibackd.toml --log-level DEBUG
  pcibackd check-config              validate the config and the policy it names, print the settings

Without Xen there is nothing to serve: the simulated dom0 that the demo, the
tests and the benchmarks use lives in the source tree (./dev demo).
"""


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground",
                       description="Watch xenstore for PCI backends and serve each guest from its own worker. "
                                   "Signals: SIGTERM exits handing the workers over (they serve on for "
                                   "handover_grace for the next daemon to adopt them), SIGINT (Ctrl-C) stops "
                                   "them too, SIGHUP reloads the config and the policy.")
    p.add_argument("--config", help="TOML config (default /etc/pcibackd/pcibackd.toml if present)")
    p.add_argument("--platform", metavar="SPEC",
                   help="xen (the default on a Xen dom0), or sim:DIR for the simulated dom0 of a checkout")
    p.add_argument("--xenstored-path", help="xenstored socket (default: $XENSTORED_PATH or the system one)")
    p.add_argument("--runtime-dir", help="control socket and claims (default /run/pcibackd)")
    p.add_argument("--state-dir", help="the assignable pool's directory (default /var/lib/pcibackd)")
    p.add_argument("--topology", choices=("vpci", "passthrough"), help="guest PCI topology (default vpci)")
    p.add_argument("--poll-window-us", type=float, help="busy-poll window after each op (default 50)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    p.add_argument("--heartbeat-timeout", type=float,
                   help="kill and replace a worker silent this long, seconds (default 1.0; raise on slow emulators)")
    p.add_argument("--foreground", action="store_true", help="accepted for compatibility; always foreground")
    p.add_argument("--metrics-listen", metavar="ADDR",
                   help="serve Prometheus metrics over HTTP on HOST:PORT (e.g. 127.0.0.1:9477; needs "
                        "prometheus_client, the 'metrics' extra); default: off")


def _check_parser(sub) -> None:
    p = sub.add_parser("check-config", help="validate a config file (and the policy it names)",
                       description="Check every setting of FILE (type, range, unknown keys) and the "
                                   "config-space policy file it names; print the effective settings. "
                                   "Exit 0 when valid, 1 otherwise.")
    p.add_argument("file", nargs="?", metavar="FILE", help=f"the config file (default {DEFAULT_CONFIG})")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also what the man page and shell completion are made from)."""
    parser = argparse.ArgumentParser(prog="pcibackd", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pcibackd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _run_parser(sub)
    _check_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "check-config":
        return check_config(args.file, quiet=args.quiet)
    return _run(args, parser)


def check_config(path: str | None, quiet: bool = False) -> int:
    """``pcibackd check-config``: 0 when the config (and its policy) are valid."""
    try:
        cfg = DaemonConfig.load(path)
        if cfg.policy_path:
            PolicyStore(cfg.policy_path)
    except ConfigError as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    except PolicyError as exc:
        print(f"pcibackd: {cfg.source}: policy_path: {exc}", file=sys.stderr)
        return 1
    if quiet:
        return 0
    print(f"{cfg.source}: ok" + (f"; policy {cfg.policy_path}: ok" if cfg.policy_path else ""))
    for key, value in cfg.settings().items():
        print(f"  {key} = {value!r}")
    return 0


def control_opener(cfg: DaemonConfig, metrics_listen: str | None = None):
    """How the supervisor makes its control endpoint, once its ZeroMQ context
    exists (the daemon package does not know the control package); with
    ``metrics_listen`` the endpoint also starts the HTTP metrics listener
    (a thread: only once the supervisor's fork server runs)."""
    def open_control(zctx: zmq.Context, face: DaemonFace) -> ControlServer:
        metrics = _metrics_listener(metrics_listen) if metrics_listen else None
        try:
            return ControlServer(zctx, Path(cfg.runtime_dir) / ENDPOINT_NAME, face,
                                 tcp=cfg.control_tcp, curve_dir=cfg.control_curve_dir, metrics=metrics,
                                 status_group=cfg.status_group)
        except BaseException:
            if metrics is not None:
                metrics.close()
            raise
    return open_control


def _metrics_listener(addr: str):
    if exposition is None:
        raise ControlSetupError("--metrics-listen needs prometheus_client: pip install 'pcibackd[metrics]' "
                                "(Debian: apt install python3-prometheus-client)")
    listener = exposition.MetricsListener(addr)
    try:
        where = listener.start()
    except OSError as exc:
        raise ControlSetupError(f"--metrics-listen {addr}: {exc.strerror or exc}") from None
    logger.info("metrics on {}", where)
    return listener


def _run(args, parser) -> int:
    try:
        cfg = DaemonConfig.load(args.config, platform=args.platform,
                                xenstored_path=args.xenstored_path, runtime_dir=args.runtime_dir,
                                state_dir=args.state_dir,
                                topology=args.topology, poll_window_us=args.poll_window_us,
                                log_level=args.log_level, heartbeat_timeout=args.heartbeat_timeout)
    except ConfigError as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    if args.metrics_listen and exposition is not None:
        try:
            exposition.parse_address(args.metrics_listen)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        cfg.platform = cfg.platform or default_spec()
        supervisor = Supervisor(cfg, control_opener(cfg, args.metrics_listen))
    except NotADom0 as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    except PlatformError as exc:
        hint = "" if running_on_xen() else f"; {DEMO_HINT}"
        print(f"pcibackd: {exc.strerror or exc}{hint}", file=sys.stderr)      # the errno is no news to an admin
        return 1
    except ValueError as exc:
        print(f"pcibackd: {exc}", file=sys.stderr)
        return 1
    logs.setup(cfg.log_level)
    proctitle.set_title("supervisor")
    if os.environ.get(faults.ENV):
        logger.warning("FAULT INJECTION ARMED: {}={!r}: workers will crash or hang on purpose; "
                       "for tests only, never on a production dom0", faults.ENV, os.environ[faults.ENV])
    try:
        return supervisor.run()
    except ControlSetupError as exc:
        print(f"pcibackd: control: {exc}", file=sys.stderr)
    except (ConnectionError, FileNotFoundError, TimeoutError) as exc:
        where = cfg.xenstored_path or "the default xenstored socket (or $XENSTORED_PATH)"
        print(f"pcibackd: cannot reach xenstored at {where}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
