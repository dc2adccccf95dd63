"""Config-space virtualization equal to Linux xen-pciback, written as register tables.

Entry point: :meth:`ConfSpace.build` (one per guest and device); policy from
:mod:`.policy`; lspci rendering of a guest view in :mod:`.render`.
"""

from .layout import UnsupportedDevice
from .policy import DevicePolicy, PolicyError, PolicyStore, Quirk
from .space import ConfSpace

__all__ = ["ConfSpace", "DevicePolicy", "PolicyError", "PolicyStore", "Quirk", "UnsupportedDevice"]
