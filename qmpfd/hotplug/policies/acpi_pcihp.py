"""ACPI PCI hotplug (hw/acpi/pcihp.c): ``pc`` pci.0 and bridges, ``q35`` ports with ACPI hotplug.

Unplug is per slot: ``device_del`` of any function asks the guest to eject the whole slot, and every
function goes. Rolling back functions queued without function 0 uses the same eject, so it needs a
running guest that answers ACPI (measured: ~1 s with a Linux guest).

**Why a freshly plugged slot can be ejected by the guest, unasked, and the reuse delay.** QEMU
keeps one "up" and one "down" bit per slot of each ACPI hotplug bus. ``device_del`` sets the
slot's down bit and raises an ACPI GPE; the guest's GPE method reads the bits and queues an eject
request for every slot whose down bit is set; the guest's eject (``_EJ0``, a write to the bus's
eject register) makes QEMU clear the bits and unparent *every* hotpluggable function in that slot,
whichever device is there by then (``acpi_pcihp_eject_slot``, the same in QEMU 7.2 to 11.x). Any
other hotplug on the bus (a ``device_add`` or ``device_del`` of another slot) raises another GPE;
if the guest runs the method again before its first eject of the slot lands, it queues a second
eject request for it (Linux's acpiphp does not check the down bit again before acting). The second
request runs right after the first has emptied the slot: if a new device was plugged into the
slot in between, the guest ejects it. So it takes concurrent hotplugs on one controller and the
quick reuse of a slot just emptied, which is what several clients of one VM do; under load the
guest's hotplug queue runs seconds behind, so no fixed delay is a cure.

The cure is :mod:`qmpfd.qemu.gate` (``serial_unplug``): one unplug at a time per controller,
with nothing else raising its GPE until the eject lands, so each down bit is seen by one method
run. Measured with three clients on one ``pc`` guest (bench/stress-results.md): 157 unasked
ejects in 1,007 attaches without it, none in 378 with it. :attr:`reuse_delay` (a slot just
emptied chosen last for that long; off by default) is kept as an operator's extra margin. As a
backstop, every deletion nobody asked for is announced (``SLOT_EJECTED``) and an attach that loses
functions this way is undone and answered as failed.
"""

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts

ACPI_PCIHP = Policy(name="acpi-pcihp", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0),
                    serial_unplug=True, repeated_unplug_harmless=True)
