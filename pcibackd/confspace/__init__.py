"""Config-space virtualization equal to Linux xen-pciback, written as register tables.

Pure rules over an injected :class:`~pcibackd.hostpci.port.HostPort`: no
module opens sysfs, a device or a socket.  The one file read is
:class:`PolicyStore`'s (the policy file); :mod:`.power` sleeps the settle
times of D-state changes.

Entry point: :meth:`ConfSpace.build` (one per guest and device); policy from
:mod:`.policy`.  Modules, lowest first: :mod:`.pciregs` (register facts);
:mod:`.bars`, :mod:`.state`; :mod:`.spec` (descriptors and the views hooks
see); :mod:`.header`, :mod:`.caps` (tables and hooks), :mod:`.power`,
:mod:`.policy`; :mod:`.layout` (binds tables to a device); :mod:`.space`
(the dispatcher).
"""

from pcibackd.confspace.layout import UnsupportedDevice
from pcibackd.confspace.policy import DevicePolicy, PolicyError, PolicyStore, Quirk, read_policy_text
from pcibackd.confspace.space import ConfSpace

__all__ = ["ConfSpace", "DevicePolicy", "PolicyError", "PolicyStore", "Quirk", "UnsupportedDevice", "read_policy_text"]
