"""The hotplug policy of each bus of one VM (:class:`BusPolicies`): decided from what the VM
is (architecture, machine, QEMU version), each bus's hotplug mechanism, and the configured
overrides; and, from it, which QMP commands go through the ACPI unplug gate."""

from __future__ import annotations

from typing import Any, Protocol

from qmpfd.hotplug.policies import Policy, policy_for
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.introspect import VmIdentity


class Owner(Protocol):
    """The VM the policies are for: its identity once read, and its slot table."""

    identity: VmIdentity | None
    table: SlotTable


class BusPolicies:
    def __init__(self, vm: Owner, overrides: dict[str, Policy] | None) -> None:
        self._vm = vm
        #: configured timeouts and switches per policy name (config [timeouts.policy.NAME])
        self.overrides = overrides
        #: each mechanism's policy, decided once for the identity and overrides it was for
        #: (every attach asks for every bus's: a policy object per bus per request otherwise)
        self._decided: dict[str | None, Policy] = {}
        self._decided_for: tuple[object, object] | None = None

    def _policy(self, ident: VmIdentity, mechanism: str | None) -> Policy:
        if self._decided_for is None or self._decided_for[0] is not ident \
                or self._decided_for[1] is not self.overrides:
            self._decided, self._decided_for = {}, (ident, self.overrides)
        policy = self._decided.get(mechanism)
        if policy is None:
            policy = self._decided[mechanism] = policy_for(
                ident.arch, ident.machine, mechanism, self.overrides, ident.qemu_version)
        return policy

    def all(self) -> dict[str, Policy]:
        """The policy of every bus (the VM's identity must be known)."""
        ident = self._vm.identity
        assert ident is not None, "the VM's identity is read before its policies are asked"
        return {b.name: self._policy(ident, b.mechanism) for b in self._vm.table.topology.buses}

    def of(self, bus: str) -> Policy | None:
        """The policy of ``bus``; None while the VM or the bus is not known."""
        ident = self._vm.identity
        b = self._vm.table.topology.bus(bus)
        if ident is None or b is None:
            return None
        return self._policy(ident, b.mechanism)

    def gated(self, cmd: str, args: dict[str, Any]) -> bool:
        """Whether a device_add/device_del goes through the unplug gate: its bus's policy
        says so (ACPI hotplug)."""
        if cmd == "device_add":
            bus = args.get("bus")
        else:
            key = self._vm.table.find(str(args.get("id")))
            bus = key[0] if key else None
        policy = self.of(str(bus)) if bus is not None else None
        return policy is not None and policy.serial_unplug
