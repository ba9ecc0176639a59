"""qmpfd: atomic hotplug and unplug of multifunction PCI devices in QEMU VMs, over QMP."""

__version__ = "0.5.0"
#: the version as query-version and the QMP greeting give it (QEMU's major/minor/micro shape)
VERSION_TUPLE = tuple(int(part) for part in __version__.split("."))
