"""Choosing the platform by name: the daemon's one bridge to implementations.

A platform spec is ``NAME`` or ``NAME:ARG``.  ``xen`` is the real platform of
this package (grants, event channels and host PCI of a Xen dom0).  ``sim``
names the simulated dom0 that lives beside the tests (``sim/simdom0``, not part
of the installed package): it is resolved by string and imported only when
asked for, and nothing here ever chooses it by default.
"""

from __future__ import annotations

import importlib
import os

from pcibackd.platform.api import Platform

XEN_MARKERS: tuple[str, ...] = ("/proc/xen", "/dev/xen")

# name -> "module:factory"; a factory is called as factory.from_spec(arg, domid)
PLATFORMS: dict[str, str] = {
    "xen": "pcibackd.platform.xen:RealPlatform",
    "sim": "simdom0.platform:SimPlatform",
}


class NotADom0(RuntimeError):
    """No platform was named and this machine is not a Xen domain."""


def running_on_xen(markers: tuple[str, ...] | None = None) -> bool:
    """Whether this system is a Xen domain (one of :data:`XEN_MARKERS` exists)."""
    return any(os.path.exists(m) for m in (XEN_MARKERS if markers is None else markers))


def default_spec(markers: tuple[str, ...] | None = None) -> str:
    """``"xen"`` on a Xen domain; anywhere else :class:`NotADom0` (never the simulation)."""
    if running_on_xen(markers):
        return "xen"
    raise NotADom0("this machine is not a Xen dom0 (neither /proc/xen nor /dev/xen exists); "
                   "to try pcibackd without Xen, run the simulated dom0 from a checkout: ./dev demo")


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"sim:/dir"`` -> ``("sim", "/dir")``; ``"xen"`` -> ``("xen", None)``; unknown names raise ValueError."""
    name, sep, arg = spec.partition(":")
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}: choose one of {', '.join(sorted(PLATFORMS))}")
    return name, (arg if sep else None)


def platform_module(spec: str) -> str:
    """The module that implements ``spec`` (for a fork server to preload)."""
    return PLATFORMS[split_spec(spec)[0]].partition(":")[0]


def choose_platform(spec: str, domid: int = 0) -> Platform:
    """The platform named by ``spec``, acting as ``domid``."""
    name, arg = split_spec(spec)
    module, _, attr = PLATFORMS[name].partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(f"platform {name!r} is not installed here ({module}: {exc})") from exc
    return factory.from_spec(arg, domid)


def worker_paths(spec: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(paths a worker reads beneath, directories it writes beneath, device paths it issues
    ioctls on) on the platform named by ``spec``: what a worker's Landlock ruleset must allow."""
    name, arg = split_spec(spec)
    module, _, attr = PLATFORMS[name].partition(":")
    return getattr(importlib.import_module(module), attr).worker_paths(arg)
