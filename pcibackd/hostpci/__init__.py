"""Host PCI functions of a real dom0: sysfs access, seize/release, stub drivers."""
