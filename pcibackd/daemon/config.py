"""Daemon configuration: defaults in code, overridden by a TOML file and flags.

The shipped sample is ``etc/pcibackd.toml``; the service reads
``/etc/pcibackd/pcibackd.toml`` when it exists.  Every key is checked against
:data:`SETTINGS` (type and range); a bad value is a :class:`ConfigError`
naming the file and the key.  Other top-level tables register a checker in
:data:`SECTIONS`.
"""

from __future__ import annotations

import grp
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from pcibackd.platform.select import split_spec
from pcibackd.worker.privileges import DEFAULT_UID_BASE, MAX_DOMID, check_uid_base, in_worker_range
from pcibackd.xl.pcispec import SpecError, parse_pattern

DEFAULT_CONFIG = Path("/etc/pcibackd/pcibackd.toml")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """One or more bad settings; ``str()`` has one ``where: key: problem`` per line."""


@dataclass
class DaemonConfig:
    platform: str | None = None          # platform spec; None = xen on a Xen dom0 (pcibackd.platform.select)
    xenstored_path: str | None = None    # xenstored socket; None = XENSTORED_PATH or the default
    runtime_dir: str = "/run/pcibackd"   # control and worker sockets, device claims
    topology: str = "vpci"               # "vpci" | "passthrough" (like xen-pciback's passthrough=)
    poll_window_us: float = 50.0         # worker busy-poll window after each op
    heartbeat_interval: float = 20.0     # an idle worker's keepalive (reports on change come sooner)
    heartbeat_timeout: float = 90.0      # backstop: a worker silent this long (our stalls excluded) is replaced;
                                         # a stuck op is caught sooner by the worker's own watchdog
    boot_timeout: float = 90.0           # a new worker's first report may take this long (at least heartbeat_timeout)
    stuck_op_seconds: float = 0.9        # a worker's own time on one op before it ends itself (worker/stuck.py)
    orphan_grace: float = 60.0           # a worker with no supervisor this long exits cleanly (>= 3 keepalives)
    handover_grace: float = 10.0         # SIGTERM: workers serve on this long for a successor (0: stop them;
                                         # at most orphan_grace)
    restart_max_failures: int = 5        # failures in a row (each within restart_stable_after) -> FATAL
    restart_stable_after: float = 10.0   # a worker up this long has its failure count reset
    policy_path: str | None = None       # config-space policy TOML (permissive, quirks)
    log_level: str = "INFO"
    stop_timeout: float = 5.0            # graceful stop: wait this long for workers
    control_tcp: str | None = None       # "tcp://ADDR:PORT": pcibackctl over TCP too, CURVE only; unset = ipc only
    control_curve_dir: str = "/etc/pcibackd/curve"   # server.key_secret + clients/*.key (see pcibackd.control.curve)
    state_dir: str = "/var/lib/pcibackd"  # what outlives a reboot of the daemon: the assignable pool
    hide: tuple[str, ...] = ()           # [devices] hide: functions made assignable at start (xen-pciback.hide)
    source: str = "(defaults)"           # where the settings came from (messages, check-config)
    _path: str | None = field(default=None, repr=False)          # what reload() reads again
    _overrides: dict = field(default_factory=dict, repr=False)
    status_group: str = "pcibackd-monitor"   # may read <runtime>/status.sock (read-only commands); "" = no socket
    worker_uid_base: int = DEFAULT_UID_BASE  # domain N's worker runs as uid and gid worker_uid_base + N

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> "DaemonConfig":
        """Defaults <- TOML file (if any) <- non-None overrides (command-line flags).

        Raises ConfigError for a file that cannot be read or parsed, an
        unknown key or a bad value (every problem, each with file and key)."""
        p = Path(path) if path else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        untrusted_values: dict[str, tuple[str, Any]] = {}
        untrusted_sections: dict[str, tuple[str, Any]] = {}
        problems: list[str] = []
        if p is not None:
            settings, tables = _read_file(p, problems)
            untrusted_values = {key: (f"{p}", value) for key, value in settings.items()}
            untrusted_sections = {name: (f"{p}", table) for name, table in tables.items()}
        for key, value in overrides.items():
            if value is not None:
                untrusted_values[key] = (f"--{key.replace('_', '-')}", value)
        cfg = cls(source=str(p) if p else "(defaults)", _path=str(path) if path else None,
                  _overrides={k: v for k, v in overrides.items() if v is not None})
        for name, (where, table) in untrusted_sections.items():
            try:
                for key, value in SECTIONS[name](table).items():
                    setattr(cfg, key, value)
            except (TypeError, ValueError) as exc:
                problems.append(f"{where}: [{name}] {exc}")
        for key, (where, untrusted) in untrusted_values.items():
            try:
                setattr(cfg, key, SETTINGS[key].check(untrusted))
            except (TypeError, ValueError) as exc:
                problems.append(f"{where}: {key}: {exc}")
        problems += [f"{cfg.source}: {msg}" for msg in _cross_checks(cfg)]
        if problems:
            raise ConfigError("\n".join(problems))
        return cfg

    def reload(self) -> "DaemonConfig":
        """The same file read again, with the same flags on top (ConfigError as load)."""
        return type(self).load(self._path, **self._overrides)

    def apply(self, new: "DaemonConfig") -> tuple[list[str], list[str]]:
        """Take ``new``'s values of the settings a running daemon can change;
        return (changed and applied, changed but needing a restart)."""
        applied, frozen = [], []
        for key in SETTINGS:
            if getattr(new, key) != getattr(self, key):
                if key in LIVE:
                    setattr(self, key, getattr(new, key))
                    applied.append(key)
                else:
                    frozen.append(key)
        return applied, frozen

    def settings(self) -> dict[str, Any]:
        """Every setting by name (what ``pcibackd check-config`` prints)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in SETTINGS}


def _read_file(p: Path, problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[pcibackd]`` keys of file ``p`` (or its top level), and its other
    known tables (for their SECTIONS reader); problems are appended."""
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    if "pcibackd" in data:
        section = data.pop("pcibackd")
        if not isinstance(section, dict):
            raise ConfigError(f"{p}: pcibackd: must be a table ([pcibackd])")
    else:       # no [pcibackd] table: top-level keys are settings
        section = {k: data.pop(k) for k in list(data) if not isinstance(data[k], dict)}
    for name in data:
        if name not in SECTIONS:
            problems.append(f"{p}: [{name}]: unknown table (known: pcibackd"
                            + "".join(f", {s}" for s in sorted(SECTIONS)) + ")")
    for key in section:
        if key not in SETTINGS:
            problems.append(f"{p}: {key}: unknown setting (known: {', '.join(SETTINGS)})")
    return ({k: v for k, v in section.items() if k in SETTINGS},
            {name: table for name, table in data.items() if name in SECTIONS})


# ----------------------------------------------------------------- checks --
@dataclass(frozen=True)
class Setting:
    """How one key is checked: ``check(untrusted) -> value`` raises ValueError/TypeError."""

    check: Callable[[Any], Any]
    help: str


def _number(kind: type, low: float | None = None, above: float | None = None) -> Callable[[Any], Any]:
    """An int (or float, which also takes ints) with an inclusive ``low`` or exclusive ``above`` bound."""
    def check(untrusted):
        if isinstance(untrusted, bool) or not isinstance(untrusted, (int, float) if kind is float else int):
            raise TypeError(f"must be {'a number' if kind is float else 'an integer'}, not {untrusted!r}")
        value = kind(untrusted)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"must be a finite number, not {untrusted!r}")
        if low is not None and value < low:
            raise ValueError(f"must be >= {low}, not {untrusted!r}")
        if above is not None and value <= above:
            raise ValueError(f"must be > {above}, not {untrusted!r}")
        return value
    return check


def _text(validate: Callable[[str], str] | None = None) -> Callable[[Any], str]:
    def check(untrusted):
        if not isinstance(untrusted, str) or not untrusted:
            raise TypeError(f"must be a non-empty string, not {untrusted!r}")
        return validate(untrusted) if validate else untrusted
    return check


def _choice(*allowed: str, fold: bool = False) -> Callable[[Any], str]:
    def validate(s: str) -> str:
        value = s.upper() if fold else s
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {s!r}")
        return value
    return _text(validate)


def _absolute(s: str) -> str:
    if not s.startswith("/"):
        raise ValueError(f"must be an absolute path, not {s!r}")
    return s


def _platform(s: str) -> str:
    name, arg = split_spec(s)           # ValueError names the known platforms
    if name == "sim" and not arg:
        raise ValueError("sim needs its directory: sim:DIR")
    return s


def _group(untrusted: object) -> str:
    if not isinstance(untrusted, str) or len(untrusted) > 32 or any(c in untrusted for c in ":/\n\0 "):
        raise ValueError(f"must be a group name (or \"\" for none), not {untrusted!r}")
    return untrusted


def _uid_base(untrusted: object) -> int:
    if isinstance(untrusted, bool) or not isinstance(untrusted, int):
        raise TypeError(f"must be an integer, not {untrusted!r}")
    return check_uid_base(untrusted)


def _tcp(s: str) -> str:
    host, sep, port = s.removeprefix("tcp://").rpartition(":")
    if not s.startswith("tcp://") or not sep or not host or not (port == "*" or port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"must be tcp://ADDRESS:PORT (PORT may be *), not {s!r}")
    return s


SETTINGS: dict[str, Setting] = {
    "platform": Setting(_text(_platform), '"xen" or "sim:DIR"'),
    "xenstored_path": Setting(_text(_absolute), "xenstored socket path"),
    "runtime_dir": Setting(_text(_absolute), "runtime directory"),
    "topology": Setting(_choice("vpci", "passthrough"), "guest PCI topology"),
    "poll_window_us": Setting(_number(float, low=0), "busy-poll window, microseconds"),
    "heartbeat_interval": Setting(_number(float, above=0), "seconds between worker beats"),
    "heartbeat_timeout": Setting(_number(float, above=0), "seconds of silence before a worker is replaced"),
    "boot_timeout": Setting(_number(float, above=0), "seconds a new worker may take to its first beat"),
    "stuck_op_seconds": Setting(_number(float, above=0), "seconds of a worker's own time on one op: stuck"),
    "orphan_grace": Setting(_number(float, above=0), "seconds a worker waits for a supervisor"),
    "handover_grace": Setting(_number(float, low=0), "seconds workers serve on after SIGTERM for a successor"),
    "restart_max_failures": Setting(_number(int, low=1), "failures in a row before FATAL"),
    "restart_stable_after": Setting(_number(float, low=0), "seconds up that reset the failure count"),
    "policy_path": Setting(_text(_absolute), "config-space policy file"),
    "log_level": Setting(_choice(*LOG_LEVELS, fold=True), "log level"),
    "stop_timeout": Setting(_number(float, above=0), "seconds to wait for workers on stop"),
    "control_tcp": Setting(_text(_tcp), "tcp://ADDRESS:PORT (CURVE only)"),
    "control_curve_dir": Setting(_text(_absolute), "CURVE key directory"),
    "state_dir": Setting(_text(_absolute), "what outlives a daemon restart: the assignable pool"),
    "status_group": Setting(_group, 'group that may read status.sock (read-only commands); "" = no socket'),
    "worker_uid_base": Setting(_uid_base, f"domain N's worker runs as uid/gid worker_uid_base + N "
                                          f"(N up to {MAX_DOMID:#x}): ids no user or group has"),
}

# What SIGHUP (systemctl reload) changes in a running daemon; workers started
# from then on get the new values.  The rest needs a restart.
LIVE = frozenset({"poll_window_us", "heartbeat_interval", "heartbeat_timeout", "boot_timeout", "orphan_grace",
                  "handover_grace", "stuck_op_seconds",
                  "restart_max_failures", "restart_stable_after", "log_level", "stop_timeout"})

def _devices_section(untrusted: object) -> dict[str, Any]:
    """``[devices] hide = ["0000:03:00.0", "0000:04:00.*"]``: addresses or slot wildcards."""
    if not isinstance(untrusted, dict) or set(untrusted) - {"hide"}:
        raise ValueError('takes only hide = ["BDF", ...]')
    hide = untrusted.get("hide", [])
    if not isinstance(hide, list) or not all(isinstance(h, str) for h in hide):
        raise ValueError("hide must be a list of PCI addresses")
    for pattern in hide:
        try:
            parse_pattern(pattern)
        except SpecError as exc:
            raise ValueError(f"hide: {exc}") from None
    return {"hide": tuple(hide)}


# Other top-level tables: name -> reader(table) returning the fields it sets (ValueError: its problem).
SECTIONS: dict[str, Callable[[Any], dict[str, Any]]] = {"devices": _devices_section}


def _cross_checks(cfg: DaemonConfig) -> list[str]:
    """Relations between settings (each value is already valid on its own)."""
    out = []
    if cfg.heartbeat_timeout <= cfg.heartbeat_interval:
        out.append(f"heartbeat_timeout ({cfg.heartbeat_timeout}) must be longer than "
                   f"heartbeat_interval ({cfg.heartbeat_interval})")
    if cfg.status_group:
        try:
            gid = grp.getgrnam(cfg.status_group).gr_gid
        except KeyError:
            gid = None          # no such group: no status socket (the server says so)
        if gid is not None and in_worker_range(cfg.worker_uid_base, gid):
            out.append(f"status_group {cfg.status_group!r} (gid {gid}) is in the workers' range "
                       f"worker_uid_base ({cfg.worker_uid_base:#x}) .. +{MAX_DOMID:#x}: a worker would read status")
    if cfg.orphan_grace <= cfg.heartbeat_interval:
        out.append(f"orphan_grace ({cfg.orphan_grace}) must be longer than "
                   f"heartbeat_interval ({cfg.heartbeat_interval})")
    return out
