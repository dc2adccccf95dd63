"""Pure parsers of xl's syntax: a PCI spec (xl-pci-configuration(5)) and an xl config file (xl.cfg(5))."""
