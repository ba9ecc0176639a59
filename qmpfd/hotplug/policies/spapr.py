"""sPAPR (ppc64 ``pseries``) PCI hotplug, hw/ppc/spapr_pci.c.

- Every function has its own DRC. QEMU defers the plug of non-zero functions until function 0
  arrives and then tells the guest about all of them: non-zero first, function 0 last, as elsewhere.
- Unplug: ``device_del`` of function 0 cascades to every function of the slot, and the guest
  releases them 7..0. QEMU <= 4.1 refused that until every non-zero function had been unplugged, so
  there the non-zero functions are unplugged first, then function 0.
- The guest answers through RTAS (drmgr in the guest's userspace), which is slow: longer timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qmpfd.hotplug.policies.base import Policy, PolicyTimeouts, SlotMember

#: The last QEMU whose spapr unplug of function 0 did not cascade to the other functions.
LAST_NON_CASCADING = (4, 1)


@dataclass(frozen=True)
class SpaprPolicy(Policy):
    nonzero_first: bool = False

    def unplug_targets(self, members: Sequence[SlotMember]) -> list[str]:
        ordered = sorted(members, key=lambda m: m.function, reverse=True)
        if self.nonzero_first:
            return [m.id for m in ordered]          # 7..1, then 0
        zero = [m.id for m in members if m.function == 0]
        return zero or [m.id for m in ordered]      # no function 0: each one (deferred plugs)

    def rollback_targets(self, added: Sequence[SlotMember]) -> list[str]:
        # Without function 0 the non-zero functions were never shown to the guest; each is
        # removed on its own.
        if not any(m.function == 0 for m in added):
            return [m.id for m in sorted(added, key=lambda m: m.function, reverse=True)]
        return self.unplug_targets(added)


SPAPR = SpaprPolicy(name="spapr", timeouts=PolicyTimeouts(plug=10.0, unplug=90.0))
SPAPR_LEGACY = SpaprPolicy(name="spapr", timeouts=PolicyTimeouts(plug=10.0, unplug=90.0),
                           nonzero_first=True)


def spapr_for(qemu_version: tuple[int, int, int]) -> SpaprPolicy:
    return SPAPR_LEGACY if qemu_version[:2] <= LAST_NON_CASCADING else SPAPR
