"""Incremental attach (``function-add``): non-zero functions wait in qmpfd, function 0 flushes.

A queue is journaled before it exists in memory (a failed write leaves no queue entry), and it
leaves the journal only once its flush is over: a crash during the flush leaves it there, and the
restarted qmpfd offers it again unless QEMU already has its slot or ids (:func:`prune`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from qmpfd.errors import Conflict, NotFound, QmpfdError, Unsupported
from qmpfd.hotplug.pending import PendingSlot, preview
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.slots import SlotKey, SlotState
from qmpfd.vm.context import VmContext
from qmpfd.vm.operations import plan_and_reserve, run_attach
from qmpfd.vm.results import AttachResult, QueuedResult

log = logging.getLogger("qmpfd.vm")


async def function_add(vm: VmContext, spec: FunctionSpec, bus: str,
                       slot: int) -> QueuedResult | AttachResult:
    key = (bus, slot)
    table = vm.table
    async with vm.alloc:
        b = table.hotpluggable_bus(bus)
        table.check_slot_number(b, slot)
        state = table.state(key)
        if state not in (SlotState.EMPTY, SlotState.QUEUED):
            table.check_free(key)
        queued = table.queued(key)
        if queued is not None and any(f.id == spec.id for f in queued.functions.values()):
            raise Conflict(f"id: '{spec.id}' is already queued for {bus} slot {slot}")
        table.check_new_ids([("id", spec.id)])
        if spec.function != 0:
            policy = vm.policies()[bus]
            if not policy.multifunction:
                raise Unsupported(policy.unsupported_reason)
            entry = preview(queued, spec, bus, slot, vm.pending_ttl)   # raises on a clash
            await vm.journal.queue_saved(vm.name, entry.to_record(time.monotonic(), time.time()))
            table.queue(key, entry)
            vm.events.queued(bus, slot, spec.function, spec.id)
            return QueuedResult(vm.name, entry)
        # Function 0: the queue becomes one attach. It leaves the slot and the slot is
        # claimed (attaching) under the same lock, so nobody can take it in between.
        if queued is not None:
            table.unqueue(key)
        functions = [*(queued.functions.values() if queued else []), spec]
        try:
            plan = plan_and_reserve(vm, functions, bus, slot, None)
        except QmpfdError:
            if queued is not None:
                table.queue(key, queued)
            raise
    try:
        await run_attach(vm, plan)
    finally:
        if queued is not None:
            vm.journal.queue_consumed(vm.name, bus, slot)   # flushed (or failed whole)
    return AttachResult(vm.name, plan)


async def pending_cancel(vm: VmContext, bus: str, slot: int) -> PendingSlot:
    async with vm.alloc:
        if vm.table.queued((bus, slot)) is None:
            raise NotFound(f"bus/slot: nothing is queued for {bus} slot {slot}")
        await vm.journal.queue_cancelled(vm.name, bus, slot)   # durable: failure changes nothing
        entry = vm.table.unqueue((bus, slot))
        vm.events.queue_cancelled(bus, slot, [f.id for f in entry.functions.values()])
        return entry


def expire(vm: VmContext, key: SlotKey) -> None:
    entry = vm.table.unqueue(key)
    vm.journal.queue_consumed(vm.name, entry.bus, entry.slot)
    vm.events.queue_expired(entry.bus, entry.slot,
                            [f.id for f in entry.functions.values()])


async def prune(vm: VmContext) -> None:
    """After (re)connecting: drop restored queues that QEMU has overtaken (their slot is
    occupied, or one of their ids exists), which a crash in the middle of a flush or a change
    made behind qmpfd's back can leave."""
    topo = vm.table.topology
    present = topo.device_ids()
    for entry in vm.table.queues():
        b = topo.bus(entry.bus)
        ids = {f.id for f in entry.functions.values()}
        if b is None or not b.slot(entry.slot).empty or ids & present:
            log.warning("queued functions dropped: QEMU has their slot or ids",
                        extra={"vm": vm.name, "bus": entry.bus, "slot": entry.slot,
                               "ids": sorted(ids)})
            expire(vm, (entry.bus, entry.slot))


async def expire_loop(vm: VmContext) -> None:
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for entry in vm.table.queues():
            if entry.expires_at <= now:
                expire(vm, (entry.bus, entry.slot))
