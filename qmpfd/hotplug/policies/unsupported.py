"""Architectures and buses where qmpfd does not (yet) do multifunction hotplug.

s390x: QEMU refuses multifunction on zPCI ("multifunction not supported in s390"); single functions
still take the ordinary path. Any other architecture or mechanism: a clear Unsupported.
"""

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts

S390_ZPCI = Policy(
    name="s390-zpci", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0), multifunction=False,
    unsupported_reason="s390x zPCI has no multifunction PCI slots "
                       "(QEMU: multifunction not supported in s390)")


#: Mechanisms QEMU offers that qmpfd recognises but does not drive, and why.
NOT_DRIVEN = {
    "acpi-ged": "ACPI PCI hotplug through acpi-ged (arm64 virt, QEMU >= 10.1, opt-in) is not "
                "driven by qmpfd: the guest uses it only when booted through UEFI and it is not "
                "proven here; leave acpi-ged's acpi-pci-hotplug-with-bridge-support off (the "
                "default) to hotplug natively on PCIe root ports",
    "shpc": "the bus is served by its bridge's own SHPC controller (a bridge without ACPI "
            "hotplug, or one hot-plugged on QEMU >= 8.0), which qmpfd does not drive; use a "
            "cold-plugged bridge, a root bus or a PCIe root port",
}


def not_yet(arch: str, machine: str, mechanism: str | None = None) -> Policy:
    reason = NOT_DRIVEN.get(mechanism or "") or (
        f"multifunction hotplug on {arch} machine '{machine}' is not supported by this qmpfd "
        "version")
    return Policy(
        name="unsupported", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0), multifunction=False,
        unsupported_reason=reason)
