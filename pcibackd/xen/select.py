"""Choosing the platform: ``xen`` (real grants and event channels) or ``sim``.

Without a name, ``xen`` is chosen when this system is a Xen domain (``/proc/xen``
or ``/dev/xen`` exists), else ``sim``.  The modules are imported on demand, so
the simulation never loads the Xen libraries and a real dom0 never needs the
simulator's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .platform import Platform

XEN_MARKERS: tuple[str, ...] = ("/proc/xen", "/dev/xen")


def _xen(sim_dir: str | Path | None, domid: int) -> Platform:
    from .real import RealPlatform
    return RealPlatform(domid)


def _sim(sim_dir: str | Path | None, domid: int) -> Platform:
    if sim_dir is None:
        raise ValueError("the sim platform needs a sim_dir")
    from .sim import SimPlatform
    return SimPlatform(sim_dir, domid)


FACTORIES: dict[str, Callable[[str | Path | None, int], Platform]] = {"xen": _xen, "sim": _sim}


def default_platform_name(markers: tuple[str, ...] = XEN_MARKERS) -> str:
    """``"xen"`` when any of ``markers`` exists, else ``"sim"``."""
    return "xen" if any(os.path.exists(m) for m in markers) else "sim"


def choose_platform(name: str | None = None, sim_dir: str | Path | None = None, domid: int = 0) -> Platform:
    """The platform called ``name`` (detected when None); ``sim_dir`` is for ``sim`` only."""
    chosen = name or default_platform_name()
    factory = FACTORIES.get(chosen)
    if factory is None:
        raise ValueError(f"unknown platform {chosen!r}: choose one of {', '.join(sorted(FACTORIES))}")
    return factory(sim_dir, domid)
