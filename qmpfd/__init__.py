"""qmpfd: atomic hotplug and unplug of multifunction PCI devices in QEMU VMs, over QMP."""

__version__ = "0.4.0"
VERSION_TUPLE = (0, 1, 0)
