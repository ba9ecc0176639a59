"""Choosing a policy: per bus from its hotplug mechanism, with the VM's architecture as a veto."""

from __future__ import annotations

from qmpfd.hotplug.policies.acpi_pcihp import ACPI_PCIHP
from qmpfd.hotplug.policies.base import Policy
from qmpfd.hotplug.policies.pcie_native import PCIE_NATIVE
from qmpfd.hotplug.policies.spapr import SPAPR, spapr_for
from qmpfd.hotplug.policies.unsupported import S390_ZPCI, not_yet

POLICIES: dict[str, Policy] = {p.name: p for p in (ACPI_PCIHP, PCIE_NATIVE, SPAPR)}

#: Which mechanisms qmpfd drives on which architecture.
SUPPORTED = {
    "x86_64": {"acpi-pcihp", "pcie-native"},
    "i386": {"acpi-pcihp", "pcie-native"},
    "aarch64": {"pcie-native"},
    "ppc64": {"spapr"},
}


def policy_for(arch: str, machine: str, mechanism: str | None,
               overrides: dict[str, Policy] | None = None,
               qemu_version: tuple[int, int, int] = (99, 0, 0)) -> Policy:
    """The policy for a bus served by ``mechanism`` on a VM of ``arch``/``machine``."""
    table = overrides or POLICIES
    if arch == "s390x":
        return S390_ZPCI  # one function at a time; any multifunction request is refused
    if mechanism is None or mechanism not in SUPPORTED.get(arch, set()) or mechanism not in table:
        return not_yet(arch, machine, mechanism)
    policy = table[mechanism]
    if mechanism == "spapr":
        # Same timeouts as configured, but the unplug order follows the QEMU version.
        base = spapr_for(qemu_version)
        return base.with_timeouts(policy.timeouts.plug, policy.timeouts.unplug)
    return policy


def vm_policy_name(arch: str, machine: str, mechanisms: list[str]) -> str:
    """The headline policy of a VM: that of most of its hotpluggable buses."""
    return policy_for(arch, machine, mechanisms[0] if mechanisms else None).name
