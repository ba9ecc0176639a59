"""The host's PCI devices: read from sysfs, named from pci.ids, judged for assignment to a guest."""
