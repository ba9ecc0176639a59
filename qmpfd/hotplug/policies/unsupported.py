"""Architectures and buses where qmpfd does not (yet) do multifunction hotplug.

s390x: QEMU refuses multifunction on zPCI ("multifunction not supported in s390"); single functions
still take the ordinary path. Any other architecture or mechanism: a clear Unsupported.
"""

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts

S390_ZPCI = Policy(
    name="s390-zpci", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0), multifunction=False,
    unsupported_reason="s390x zPCI has no multifunction PCI slots "
                       "(QEMU: multifunction not supported in s390)")


def not_yet(arch: str, machine: str) -> Policy:
    return Policy(
        name="unsupported", timeouts=PolicyTimeouts(plug=10.0, unplug=30.0), multifunction=False,
        unsupported_reason=f"multifunction hotplug on {arch} machine '{machine}' is not supported "
                           "by this qmpfd version")
