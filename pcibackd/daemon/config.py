"""Daemon configuration: defaults in code, overridden by a TOML file and flags.

The shipped sample is ``etc/pcibackd.toml``; the service reads
``/etc/pcibackd/pcibackd.toml`` when it exists.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/pcibackd/pcibackd.toml")


@dataclass
class DaemonConfig:
    platform: str | None = None          # platform spec; None = xen on a Xen dom0 (pcibackd.platform.select)
    xenstored_path: str | None = None    # xenstored socket; None = XENSTORED_PATH or the default
    runtime_dir: str = "/run/pcibackd"   # control and worker sockets, device claims
    topology: str = "vpci"               # "vpci" | "passthrough" (like xen-pciback's passthrough=)
    poll_window_us: float = 50.0         # worker busy-poll window after each op
    heartbeat_interval: float = 0.2      # worker -> supervisor beats
    heartbeat_timeout: float = 1.0       # a silent worker is killed and replaced: well inside pcifront's 2 s
    boot_timeout: float = 10.0           # a new worker's first beat may take this long (at least heartbeat_timeout)
    orphan_grace: float = 30.0           # a worker with no supervisor this long exits cleanly
    restart_max_failures: int = 5        # failures in a row (each within restart_stable_after) -> FATAL
    restart_stable_after: float = 10.0   # a worker up this long has its failure count reset
    policy_path: str | None = None       # config-space policy TOML (permissive, quirks)
    log_level: str = "INFO"
    stop_timeout: float = 5.0            # graceful stop: wait this long for workers
    control_tcp: str | None = None       # "tcp://ADDR:PORT": pcibackctl over TCP too, CURVE only; unset = ipc only
    control_curve_dir: str = "/etc/pcibackd/curve"   # server.key_secret + clients/*.key (see pcibackd.control.curve)
    status_group: str = "pcibackd-monitor"   # may read <runtime>/status.sock (read-only commands); "" = no socket

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> "DaemonConfig":
        """Defaults <- TOML file (if any) <- non-None overrides; unknown keys are errors."""
        cfg = cls()
        p = Path(path) if path else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        names = {f.name for f in fields(cls)}
        if p is not None:
            data = tomllib.loads(p.read_text())
            section = data.get("pcibackd", data)
            unknown = set(section) - names
            if unknown:
                raise ValueError(f"{p}: unknown settings {sorted(unknown)}")
            for k, v in section.items():
                setattr(cfg, k, v)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        if cfg.topology not in ("vpci", "passthrough"):
            raise ValueError(f"topology must be vpci or passthrough, not {cfg.topology!r}")
        if cfg.control_tcp is not None and not str(cfg.control_tcp).startswith("tcp://"):
            raise ValueError(f"control_tcp must be tcp://ADDRESS:PORT, not {cfg.control_tcp!r}")
        return cfg
