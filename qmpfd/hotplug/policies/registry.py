"""Choosing a policy: per bus from its hotplug mechanism, with the VM's architecture as a veto."""

from __future__ import annotations

from qmpfd.hotplug.policies.acpi_pcihp import ACPI_PCIHP
from qmpfd.hotplug.policies.base import Policy
from qmpfd.hotplug.policies.pcie_native import PCIE_NATIVE
from qmpfd.hotplug.policies.unsupported import S390_ZPCI, not_yet

POLICIES: dict[str, Policy] = {p.name: p for p in (ACPI_PCIHP, PCIE_NATIVE)}

#: Architectures whose mechanisms qmpfd has proven on real guests.
SUPPORTED_ARCHES = frozenset({"x86_64", "i386"})


def policy_for(arch: str, machine: str, mechanism: str | None,
               overrides: dict[str, Policy] | None = None) -> Policy:
    """The policy for a bus served by ``mechanism`` on a VM of ``arch``/``machine``."""
    table = overrides or POLICIES
    if arch == "s390x":
        return S390_ZPCI
    if arch not in SUPPORTED_ARCHES or mechanism is None or mechanism not in table:
        return not_yet(arch, machine)
    return table[mechanism]


def vm_policy_name(arch: str, machine: str, mechanisms: list[str]) -> str:
    """The headline policy of a VM: that of most of its hotpluggable buses."""
    return policy_for(arch, machine, mechanisms[0] if mechanisms else None).name
