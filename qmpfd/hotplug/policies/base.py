"""What every hotplug policy answers: plug order, what unplug sends, what rollback sends, timeouts.

Policies are small immutable objects with no I/O. The planner asks them how to order a plug; the
executor asks them which ``device_del`` commands to send and how long to wait for DEVICE_DELETED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

#: Refusals QEMU documents as "not now" rather than "no": the guest is still powering the slot
#: (native PCIe and SHPC refuse ``device_del`` while the power indicator blinks, QEMU >= 6.2).
#: The same command a moment later succeeds, so it is retried until the request's deadline.
TRANSIENT_REFUSALS = ("guest is busy",)


def is_transient(desc: str) -> bool:
    return any(marker in desc for marker in TRANSIENT_REFUSALS)


@dataclass(frozen=True)
class PolicyTimeouts:
    plug: float      # per device_add
    unplug: float    # from the first device_del to the last DEVICE_DELETED


@dataclass(frozen=True)
class SlotMember:
    """A function of the slot being unplugged or rolled back."""

    id: str
    function: int


@dataclass(frozen=True)
class Policy:
    name: str
    timeouts: PolicyTimeouts
    multifunction: bool = True
    #: Why this policy cannot do multifunction hotplug (shown in Unsupported errors).
    unsupported_reason: str = ""
    #: Whether unplug needs a cooperating guest (ACPI eject, PCIe attention button).
    guest_driven_unplug: bool = True
    #: Seconds a slot whose functions just left QEMU is not given to a new device: where the
    #: guest may still act on a request about the slot's previous occupant.
    reuse_delay: float = 0.0
    #: Whether an unplug must be the only hotplug event the guest handles on the controller
    #: until it completes (:mod:`qmpfd.qemu.gate`).
    serial_unplug: bool = False
    #: Whether a second ``device_del`` for a slot already being unplugged is harmless (QEMU
    #: asks the guest again or refuses it; it never cancels the first). Then a detach needs no
    #: durable record before its ``device_del``: see :mod:`qmpfd.state.journal`.
    repeated_unplug_harmless: bool = False

    def with_timeouts(self, plug: float | None, unplug: float | None,
                      reuse_delay: float | None = None,
                      serial_unplug: bool | None = None) -> Policy:
        return replace(self, timeouts=PolicyTimeouts(
            plug=plug if plug is not None else self.timeouts.plug,
            unplug=unplug if unplug is not None else self.timeouts.unplug),
            reuse_delay=reuse_delay if reuse_delay is not None else self.reuse_delay,
            serial_unplug=serial_unplug if serial_unplug is not None else self.serial_unplug)

    def plug_order(self, functions: Sequence[int]) -> list[int]:
        """Non-zero functions first (QEMU hides them until function 0 exists), function 0 last."""
        return sorted(functions, key=lambda f: (f == 0, f))

    def unplug_targets(self, members: Sequence[SlotMember]) -> list[str]:
        """Ids to ``device_del`` to remove the whole slot (the hardware removes all functions)."""
        zero = [m.id for m in members if m.function == 0]
        return zero or [min(members, key=lambda m: m.function).id]

    def rollback_targets(self, added: Sequence[SlotMember]) -> list[str]:
        """Ids to ``device_del`` to take back functions added before an attach failed."""
        return self.unplug_targets(added)

    def describe(self) -> dict[str, object]:
        return {
            "policy": self.name,
            "multifunction": self.multifunction,
            "timeouts": {"plug": self.timeouts.plug, "unplug": self.timeouts.unplug},
            "guest-driven-unplug": self.guest_driven_unplug,
            "reuse-delay": self.reuse_delay,
            "serial-unplug": self.serial_unplug,
        }
