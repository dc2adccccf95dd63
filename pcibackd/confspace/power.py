"""D-state changes requested through PMCSR, done the way the host PCI layer does them.

A port may provide ``set_power_state(state) -> bool`` (the host device layer,
e.g. a sysfs-backed implementation that asks the kernel); otherwise the
PMCSR power-state field is written here through the port, honouring the
transition rules and the settle times of the PCI PM specification (the one
place in confspace that sleeps).
"""

from __future__ import annotations

import time

from pcibackd.hostpci.port import HostPort
from pcibackd.wire.pciregs import (D0, D1, D2, D3HOT, PM_CTRL, PMC_D1, PMC_D2,
                                        PMCSR_PME_STATUS, PMCSR_STATE)

# Recovery time after leaving/entering a state before the next config access.
_SETTLE_S = {D3HOT: 0.010, D2: 0.0002}


def transition_allowed(current: int, target: int, pmc: int) -> bool:
    """D0 from anywhere; otherwise only deeper, and D1/D2 only if the device supports them."""
    if target == D1 and not pmc & PMC_D1 or target == D2 and not pmc & PMC_D2:
        return False
    return target == D0 or target > current


def set_power_state(port: HostPort, pm_base: int, pmc: int, target: int) -> bool:
    """Move the device to ``target`` (0-3); False if the change is not allowed or failed."""
    csr = port.read(pm_base + PM_CTRL, 2)
    current = csr & PMCSR_STATE
    if target == current:
        return True
    if not transition_allowed(current, target, pmc):
        return False
    host = getattr(port, "set_power_state", None)
    if callable(host):
        return bool(host(target))
    port.write(pm_base + PM_CTRL, 2, (csr & ~(PMCSR_STATE | PMCSR_PME_STATUS)) | target)
    settle = _SETTLE_S.get(max(current, target), 0.0)
    if settle:
        time.sleep(settle)       # spec-mandated recovery time, not synchronisation
    return (port.read(pm_base + PM_CTRL, 2) & PMCSR_STATE) == target
