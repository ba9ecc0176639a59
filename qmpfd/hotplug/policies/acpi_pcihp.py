"""ACPI PCI hotplug (hw/acpi/pcihp.c): ``pc`` pci.0 and bridges, ``q35`` ports with ACPI hotplug.

Unplug is per slot: ``device_del`` of any function asks the guest to eject the whole slot, and every
function goes. Rolling back functions queued without function 0 uses the same eject, so it needs a
running guest that answers ACPI (measured: ~1 s with a Linux guest).
"""

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts

ACPI_PCIHP = Policy(name="acpi-pcihp", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0))
