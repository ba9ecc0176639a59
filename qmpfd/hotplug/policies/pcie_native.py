"""Native PCIe hotplug (hw/pci/pcie.c): root ports and switch downstream ports.

- The hotplug interrupt goes out when function 0 is plugged, so non-zero functions go first.
- ``device_del`` presses the slot's attention button; Linux pciehp waits 5 s (a second press
  cancels), then powers the slot off and QEMU removes every function behind the port.
  One press per slot.
- A non-zero function whose slot has no function 0 is removed at once, with no guest involved: that
  is the rollback path, one ``device_del`` per function added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts, SlotMember

ATTENTION_BUTTON_DELAY = 5.0


@dataclass(frozen=True)
class PcieNativePolicy(Policy):
    def rollback_targets(self, added: Sequence[SlotMember]) -> list[str]:
        if any(m.function == 0 for m in added):
            return self.unplug_targets(added)
        return [m.id for m in added]


PCIE_NATIVE = PcieNativePolicy(
    name="pcie-native",
    timeouts=PolicyTimeouts(plug=10.0, unplug=ATTENTION_BUTTON_DELAY + 25.0))
