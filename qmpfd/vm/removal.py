"""Removing a VM that has work in flight.

Dropping a VM in the middle of an attach would leave QEMU holding functions of a slot nobody
finishes or takes back (non-zero functions without function 0 are invisible to the guest, and
the journal would no longer say they were qmpfd's). So ``vm-remove`` refuses while an operation
runs, naming it; with ``force`` it first lets every operation settle (an attach completes or
rolls back on its own, a detach waits for its DEVICE_DELETED) within a bound, then says what
each one came to.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from qmpfd.errors import Conflict
from qmpfd.hotplug.slots import SlotState
from qmpfd.vm.context import VmContext

RECHECK = 1.0   # seconds between looks if no slot's work ends meanwhile


@dataclass(frozen=True)
class InFlight:
    operation: str | None     # the journaled operation, None before its record is written
    kind: str                 # "attach" or "detach"
    bus: str
    slot: int
    ids: tuple[str, ...]

    def describe(self) -> str:
        op = f"operation {self.operation}" if self.operation else "an operation"
        return f"{self.kind} {op} on {self.bus} slot {self.slot} ({', '.join(self.ids)})"


@dataclass(frozen=True)
class Settled:
    flight: InFlight
    outcome: str              # completed, rolled-back, detached, still-present, still-running
    left: tuple[str, ...] = ()   # ids QEMU still holds when the outcome is not final


def in_flight(vm: VmContext) -> list[InFlight]:
    out = [InFlight(op.id, op.kind, op.bus, op.slot, tuple(op.ids))
           for op in vm.journal.for_vm(vm.name)]
    known = {(f.bus, f.slot) for f in out}
    for work in vm.table.in_flight():
        if work.key not in known:
            kind = "attach" if work.state is SlotState.ATTACHING else "detach"
            out.append(InFlight(work.operation, kind, work.key[0], work.key[1], work.ids))
    return out


def refusal(name: str, flights: list[InFlight]) -> Conflict:
    return Conflict(f"name: VM '{name}' has {'; '.join(f.describe() for f in flights)} in "
                    "flight; wait for it, or remove with force: true to settle it first")


def settle_limit(vm: VmContext) -> float:
    """Long enough for any attach to finish or roll back and any unplug to complete."""
    policies = vm.policies().values()
    return max((p.timeouts.plug * 2 + p.timeouts.unplug for p in policies), default=30.0)


async def settle(vm: VmContext, flights: list[InFlight], limit: float) -> list[Settled]:
    """Wait (at most ``limit``) until nothing is in flight: each slot's work is awaited
    through its own future (:meth:`~qmpfd.hotplug.slot.Slot.when_ended`)."""
    deadline = time.monotonic() + limit
    while in_flight(vm) and (remaining := deadline - time.monotonic()) > 0:
        ends = [work.when_ended() for work in vm.table.in_flight()]
        # RECHECK: a journal record with no slot claim (recovery at a reconnect ends it)
        # has no future to wait on; it is looked at again this often.
        if ends:
            await asyncio.wait(ends, timeout=min(remaining, RECHECK),
                               return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(min(remaining, RECHECK))
    running = {(f.bus, f.slot) for f in in_flight(vm)}
    present = vm.table.topology.device_ids()
    out = []
    for f in flights:
        left = tuple(i for i in f.ids if i in present)
        if (f.bus, f.slot) in running:
            out.append(Settled(f, "still-running", left))
        elif f.kind == "attach":
            out.append(Settled(f, "completed" if len(left) == len(f.ids) else
                               "rolled-back" if not left else "still-present", left))
        else:
            out.append(Settled(f, "detached" if not left else "still-present", left))
    return out
