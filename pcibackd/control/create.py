"""``pcibackctl create CFG [xl create options]``: an unchanged xl config with ``pci=[...]``.

Runs on the dom0 beside the daemon: parses the config (errors name the line),
creates the domain paused with ``xl create -p`` from a copy without ``pci=``,
asks the daemon to attach every function, then unpauses it.  On any failure
the domain is destroyed; the daemon sees its backend go and the functions are
free in the pool again.  ``xl`` is whatever ``--xl`` names (the simulated dom0
has its own).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from pcibackd.xl.cfg import CfgError, parse_config

# xl create options that would stop us attaching before the guest runs, and why
REFUSED_OPTS = {"-c": "attaches the console (blocks before the guest is unpaused)",
                "-V": "attaches the VNC viewer", "--vncviewer": "attaches the VNC viewer",
                "-n": "is a dry run", "--dryrun": "is a dry run",
                "-F": "keeps xl in the foreground"}
PV_TYPES = (None, "pv")


class CreateError(Exception):
    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


def plan(cfg_path: str, xl_opts: list[str]) -> tuple[str, str, list[str]]:
    """(domain name, config text without pci=, specs to attach); CreateError names the line."""
    for opt in xl_opts:
        if opt in REFUSED_OPTS:
            raise CreateError(f"xl create {opt} {REFUSED_OPTS[opt]}: not with pcibackctl create", usage=True)
        if opt.split("=", 1)[0].strip() in ("pci", "name"):
            raise CreateError(f"{opt[:40]!r}: set pci= and name= in the config file", usage=True)
    try:
        text = Path(cfg_path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CreateError(f"{cfg_path}: {exc}", usage=True) from None
    try:
        cfg = parse_config(text, cfg_path)
        specs = cfg.pci_specs()
    except CfgError as exc:
        raise CreateError(str(exc), usage=True) from None
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise CreateError(f"{cfg_path}: name= is missing (pcibackctl names the domain by it)", usage=True)
    kind = cfg.get("type", "hvm" if cfg.get("builder") == "hvm" else None)
    if kind not in PV_TYPES:
        raise CreateError(f"{cfg_path}:{cfg.line_of('type') or cfg.line_of('builder')}: type {kind!r}: "
                          "pcibackd serves PV guests (Linux pcifront); HVM/PVH passthrough is QEMU's or Xen's",
                          usage=True)
    text = cfg.without("pci")
    if specs and cfg.get("passthrough") is None:
        # libxl gives a domain an IOMMU context only when pci= is present: ask for it explicitly
        text += '\npassthrough = "enabled"   # added by pcibackctl create (pci= taken out)\n'
    return name, text, [str(s) for s in specs]


def create(cfg_path: str, xl_opts: list[str], call: Callable[[str, dict], dict], xl: str = "xl",
           out=None, err=None) -> int:
    """The whole create; returns pcibackctl's exit code (0, 1 failed, 2 usage)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        name, text, specs = plan(cfg_path, xl_opts)
    except CreateError as exc:
        print(f"pcibackctl create: {exc}", file=err)
        return 2 if exc.usage else 1
    with tempfile.TemporaryDirectory(prefix="pcibackctl-create-") as tmp:
        stripped = Path(tmp) / Path(cfg_path).name
        stripped.write_text(text)
        paused = "-p" in xl_opts          # the administrator's own -p: leave it paused
        made = _xl(xl, ["create", "-p", *[o for o in xl_opts if o != "-p"], str(stripped)], err)
    if made is not None:
        print(f"pcibackctl create: xl create failed: {made}", file=err)
        return 1
    try:
        for spec in specs:
            rep = call("pci-attach", {"domain": name, "spec": spec})
            if rep.get("status") != "ok":
                raise CreateError(f"pci-attach {spec}: {rep.get('reason')}")
            print(f"{name}: {spec} attached", file=out)
        why = None if paused else _xl(xl, ["unpause", name], err)
        if why is not None:
            raise CreateError(f"xl unpause {name}: {why}")
    except BaseException as exc:
        gone = _xl(xl, ["destroy", name], err)
        reason = exc if isinstance(exc, CreateError) else f"{type(exc).__name__}: {exc}"
        print(f"pcibackctl create: {reason}; domain {name} destroyed"
              + (f" (xl destroy: {gone})" if gone else "") + ", its functions are back in the pool", file=err)
        if not isinstance(exc, Exception):
            raise
        return 1
    print(f"{name}: created with {len(specs)} PCI function(s)" + (", paused" if paused else ""), file=out)
    return 0


def _xl(xl: str, args: list[str], err) -> str | None:
    """Run xl; None on success, else what it said."""
    try:
        done = subprocess.run([xl, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
