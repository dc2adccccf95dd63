"""A worker's root prologue: its own state directory and its Landlock paths.

Driver: mkdir/chown under the runtime directory and the Landlock ruleset, done
before the worker reads anything its guest controls and before any thread
starts (Landlock binds the threads made later).  ``cfg`` is the worker's
:class:`~pcibackd.worker.main.WorkerConfig`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loguru import logger

from pcibackd.hostpci.records import worker_state_dir
from pcibackd.platform.select import worker_paths
from pcibackd.worker import landlock, privileges


def runtime_dir_for(cfg) -> Path:
    """The runtime directory: ``cfg.state_dir``, by default ``/run/pcibackd``."""
    return Path(cfg.state_dir or "/run/pcibackd")



# What a worker reads besides Python's paths, its state and its platform's paths:
# shared libraries (ctypes), the time zone (log stamps), sysfs attributes, /proc.
READABLE = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
            "/etc/localtime", "/usr/share/zoneinfo", "/sys", "/proc", "/dev/null", "/dev/urandom")


def own_state_dir(cfg) -> Path:
    """``<runtime>/state/dom<N>``, made now (before anything a guest controls is read) and
    given to this worker's uid; ``state/`` itself stays root's, searchable, not listable."""
    state = runtime_dir_for(cfg) / "state"
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o711)
    own = worker_state_dir(state, cfg.domid)
    own.mkdir(exist_ok=True, mode=0o700)
    if cfg.uid is not None and os.geteuid() == 0:
        if lacking := privileges.missing(("CAP_CHOWN", "CAP_SETGID", "CAP_SETUID")):
            raise PermissionError(f"cannot become uid {cfg.uid}: no {', '.join(lacking)} "
                                  f"(a service's CapabilityBoundingSet= must keep them)")
        os.chown(own, cfg.uid, cfg.uid, follow_symlinks=False)
        os.chmod(own, 0o700)
    return own


def confine_paths(cfg) -> None:
    """Landlock: from now on this worker writes only its own state directory and its
    platform's grant/event-channel paths (see :mod:`.landlock`); its devices come as descriptors."""
    runtime = runtime_dir_for(cfg)
    platform_readable, writable, devices = worker_paths(cfg.platform)
    own = (own_state_dir(cfg),)
    if not cfg.device_gate:
        own += (runtime / "claims",)
        own[-1].mkdir(parents=True, exist_ok=True, mode=0o700)
    readable = {*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, *READABLE, *platform_readable,
                *os.environ.get("LD_LIBRARY_PATH", "").split(":")}
    if cfg.policy_path:
        readable.add(cfg.policy_path)
    version = landlock.restrict(tuple(Path(p) for p in sorted(readable) if p), own + tuple(map(Path, writable)),
                                tuple(map(Path, devices)))
    if not version:
        logger.warning("no Landlock in this kernel: the worker is not confined by path")
