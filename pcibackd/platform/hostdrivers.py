"""The real :class:`~pcibackd.hostpci.drivers.HostDrivers`: sysfs binding plus libxl's hypervisor part.

Quarantine moves an assignable function into ``DOMID_IO`` (as
``xl pci-assignable-add`` does with quarantine on); giving it to a guest grants
its BARs and IRQ and assigns it in the IOMMU; taking it back revokes both and
Xen returns it to quarantine.
"""

from __future__ import annotations

from pcibackd.hostpci.drivers import DriverError, SysfsDrivers
from pcibackd.platform import xenctrl
from pcibackd.platform.api import PlatformError
from pcibackd.wire.bdf import BDF


class XenDrivers(SysfsDrivers):
    """:class:`SysfsDrivers` on a Xen dom0."""

    def quarantine(self, bdf: BDF) -> str:
        return self._xc(xenctrl.assign_device, xenctrl.DOMID_IO, bdf)

    def unquarantine(self, bdf: BDF) -> str:
        return self._xc(xenctrl.deassign_device, xenctrl.DOMID_IO, bdf)

    def give(self, domid: int, bdf: BDF) -> list[str]:
        granted = self._xc(xenctrl.grant_device, domid, bdf, root=self.root)
        try:
            return [*granted, self._xc(xenctrl.assign_device, domid, bdf)]
        except DriverError:
            self.take(domid, bdf)
            raise

    def take(self, domid: int, bdf: BDF) -> list[str]:
        return self._xc(xenctrl.revoke_device, domid, bdf, root=self.root)

    @staticmethod
    def _xc(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except PlatformError as exc:
            raise DriverError(exc.errno or 5, str(exc)) from None
