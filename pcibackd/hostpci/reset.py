"""Resetting a host function when it leaves its guest, the way the kernel does it.

Production resets through the kernel: writing sysfs ``reset`` runs
pci_reset_function, which tries the function's methods in the order sysfs
``reset_method`` lists them (an administrator may reorder or drop methods
there: that choice is honoured because the kernel applies it) and puts back
the config it saved just before.  pcibackd never resets from userspace with
config writes: the kernel serialises a reset with its other users of the
device, waits for the function to come back, and only it may reset a bus.

Where the kernel does not show ``reset_method`` (before Linux 5.15) the
methods are worked out from config space with the kernel's rules
(:func:`probe_methods`), to report which one runs.  The rules, in the
kernel's order of preference:

* ``flr``: PCIe Function Level Reset, advertised in Device Capabilities;
* ``af_flr``: the Advanced Features capability with both Transactions
  Pending and FLR;
* ``pm``: a D3hot -> D0 transition, which resets the function unless its
  PMCSR says No_Soft_Reset;
* ``bus``: a secondary bus reset of the bridge above, only for a function
  that is not a bridge and is alone on its bus (it would reset its siblings).

A function that has no method is not a failure (QEMU's edu has none): it is
restored without a reset, unless it does not answer config reads (it is
gone).  A reset that errors, or after which the function no longer answers
config reads, is.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Callable

from pcibackd.hostpci.port import find_capability
from pcibackd.wire.pciregs import CAP_PCIE, CAP_PM, HEADER_TYPE, HEADER_TYPE_MASK, PM_CTRL

Read = Callable[[int, int], int]          # (offset, size) -> value

CAP_AF = 0x13                             # Advanced Features (conventional PCI FLR)
AF_CAP = 3                                # its capabilities byte
AF_CAP_TP, AF_CAP_FLR = 0x01, 0x02
PCIE_DEVCAP = 4
PCIE_DEVCAP_FLR = 1 << 28
PMCSR_NO_SOFT_RESET = 0x0008

# Every name the kernel's reset_method may list, in its default order.
KERNEL_METHODS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")
NONE = "none"



@dataclass(frozen=True)
class ResetFacts:
    """What decides which reset methods a function has."""

    flr: bool = False            # PCIe DEVCAP FLR
    af_flr: bool = False         # AF capability with TP and FLR
    pm: bool = False             # PM capability, No_Soft_Reset clear
    alone_on_bus: bool = False   # not a bridge, below a bridge, no sibling function


PROBES: tuple[tuple[str, Callable[[ResetFacts], bool]], ...] = (
    ("flr", lambda f: f.flr),
    ("af_flr", lambda f: f.af_flr),
    ("pm", lambda f: f.pm),
    ("bus", lambda f: f.alone_on_bus),
)


def read_facts(read: Read, alone_on_bus: bool) -> ResetFacts:
    """The facts of a function from its config space (``alone_on_bus``: from the topology)."""
    pcie, af, pm = (find_capability(read, c) for c in (CAP_PCIE, CAP_AF, CAP_PM))
    af_cap = read(af + AF_CAP, 1) if af is not None else 0
    bridge = read(HEADER_TYPE, 1) & HEADER_TYPE_MASK != 0
    return ResetFacts(
        flr=pcie is not None and bool(read(pcie + PCIE_DEVCAP, 4) & PCIE_DEVCAP_FLR),
        af_flr=af_cap & (AF_CAP_TP | AF_CAP_FLR) == AF_CAP_TP | AF_CAP_FLR,
        pm=pm is not None and not read(pm + PM_CTRL, 2) & PMCSR_NO_SOFT_RESET,
        alone_on_bus=alone_on_bus and not bridge)


def probe_methods(facts: ResetFacts) -> tuple[str, ...]:
    """The methods the kernel would find, in its order."""
    return tuple(name for name, has in PROBES if has(facts))


def parse_reset_method(text: str) -> tuple[str, ...]:
    """sysfs ``reset_method``: the enabled methods, space separated, in the order tried."""
    return tuple(text.split())


@dataclass(frozen=True)
class ResetResult:
    """How a function's reset went: ``method`` ("none": it has none) and whether it worked."""

    method: str
    ok: bool
    detail: str = ""

    def describe(self) -> str:
        if self.method == NONE:
            return "no reset method" + ("" if self.ok else f", and {self.detail}")
        return f"{self.method} reset " + ("ok" if self.ok else f"failed: {self.detail}")


def _answers(read: Read) -> bool:
    # all-ones: the function is gone or stuck in a reset it never came back from
    return read(0x08, 4) != 0xFFFFFFFF


def _unreset(read: Read, detail: str) -> ResetResult:
    """A function without a reset: fine if it answers (it is restored), failed if it is gone."""
    try:
        if _answers(read):
            return ResetResult(NONE, True, detail)
        return ResetResult(NONE, False, "it does not answer config reads (gone, or wedged)")
    except OSError as exc:
        return ResetResult(NONE, False, f"reading it: {exc.strerror or exc}")


def reset_function(port) -> ResetResult:
    """Reset ``port`` with the first method it has (see the module docstring).

    ``port`` provides ``reset_methods()`` (the enabled methods, in order) and
    ``reset()`` (the kernel's reset: FileNotFoundError when it has no method).
    Never raises for a device error: a failure is in the result."""
    try:
        methods = tuple(port.reset_methods())
    except OSError as exc:
        return ResetResult("?", False, f"cannot read its reset methods: {exc.strerror or exc}")
    if not methods:
        return _unreset(port.read, "")
    method = methods[0]
    try:
        port.reset()
    except FileNotFoundError:
        # the kernel hides ``reset`` when it found no method (a quirk may veto one we probed)
        return _unreset(port.read, "the kernel offers no reset for it")
    except OSError as exc:
        reason = ("every method failed (ENOTTY)" if exc.errno == errno.ENOTTY
                  else exc.strerror or str(exc))
        return ResetResult(method, False, reason)
    try:
        if not _answers(port.read):
            return ResetResult(method, False, "it does not answer config reads after the reset")
    except OSError as exc:
        return ResetResult(method, False, f"reading it after the reset: {exc.strerror or exc}")
    return ResetResult(method, True)
