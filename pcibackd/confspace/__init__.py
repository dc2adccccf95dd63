"""Config-space virtualization equal to Linux xen-pciback, written as register tables.

Entry point: :meth:`ConfSpace.build` (one per guest and device); policy from
:mod:`.policy`; lspci rendering of a guest view in :mod:`.render`.
"""

from pcibackd.confspace.layout import UnsupportedDevice
from pcibackd.confspace.policy import DevicePolicy, PolicyError, PolicyStore, Quirk
from pcibackd.confspace.space import ConfSpace

__all__ = ["ConfSpace", "DevicePolicy", "PolicyError", "PolicyStore", "Quirk", "UnsupportedDevice"]
