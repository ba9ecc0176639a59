"""A lab for demos, integration tests and benchmarks: real QEMU with a tiny real Linux guest.

The guest is a Debian kernel plus a busybox initramfs whose init prints the guest's own PCI device
list on the serial console whenever it changes, so a test can see what the *guest* sees after a
hotplug, not what QMP claims. Not used by the daemon itself.
"""
