"""pcibackd: a userspace Xen PCI passthrough backend."""

__version__ = "0.1.0"
