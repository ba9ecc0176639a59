"""The VMs qmpfd manages: one QMP connection each, and the guest PCI topology read from QEMU."""
