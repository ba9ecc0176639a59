"""Detach of one VM's slot: resolve and claim it under the allocation lock, journal, send the
policy's device_del, and wait for every DEVICE_DELETED (:class:`~qmpfd.vm.unplug.Unplug`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qmpfd import metrics
from qmpfd.errors import Conflict, InvalidRequest, NotFound, QmpfdError, Timeout, Unsupported
from qmpfd.faults import fault_point
from qmpfd.hotplug.executor import execute_unplug
from qmpfd.hotplug.policies.base import Policy, SlotMember
from qmpfd.hotplug.slots import SlotKey, SlotState
from qmpfd.state.journal import Operation
from qmpfd.vm.context import VmContext
from qmpfd.vm.results import DetachResult
from qmpfd.vm.unplug import Unplug

log = logging.getLogger("qmpfd.vm")

FORCE_GRACE = 1.0       # a forced detach still waits this long for an immediate completion


@dataclass
class _Claimed:
    """A detach whose slot is claimed (UNPLUGGING) and whose record is written."""

    key: SlotKey
    ids: list[str]
    targets: list[str]          # what the policy sends device_del to
    policy: Policy
    op: Operation
    done: asyncio.Future[None]  # every DEVICE_DELETED, registered before anything was sent
    started: float


async def detach(vm: VmContext, *, ids: Sequence[str] | None, bus: str | None,
                 slot: int | None, whole_slot: bool, timeout: float | None,
                 force: bool = False) -> DetachResult:
    """Unplug a whole slot and wait for every DEVICE_DELETED.

    ``force``: for a guest that cannot answer (paused, no OS): send the unplug request and
    return at once with the slot 'unplugging' instead of waiting; QEMU completes it as soon
    as it can (at once where no guest is needed, otherwise when the guest runs).
    """
    async with vm.alloc:
        c = await _claim(vm, ids, bus, slot, whole_slot)
    # device_del goes out after the allocation lock is let go: a guest still busy with the
    # slot is waited out here (retried until the deadline) without holding up other slots.
    limit = timeout if timeout is not None else c.policy.timeouts.unplug
    result = DetachResult(vm.name, c.key[0], c.key[1], c.ids, 0.0)
    await _send(vm, c, limit, result)
    sent = time.monotonic()
    metrics.phase("detach", "qemu", sent - c.started)
    vm.journal.mark_sent(c.op)
    await fault_point("detach-sent")
    unplug = Unplug(vm, c.key, c.ids, c.op, started=c.started, done=c.done)
    unplug.watch()
    if not await _released(c, limit, force, result):
        return result            # forced: the slot stays 'unplugging' and completes later
    result.seconds = round(time.monotonic() - c.started, 3)
    metrics.phase("detach", "guest", time.monotonic() - sent)
    metrics.operation("detach", c.policy.name, "ok")
    assert unplug.host_released is not None
    result.host_released = await unplug.host_released
    return result


async def _claim(vm: VmContext, ids: Sequence[str] | None, bus: str | None, slot: int | None,
                 whole_slot: bool) -> _Claimed:
    """Under ``vm.alloc``: the slot resolved, checked, claimed and its detach journaled."""
    key, members = resolve_slot(vm, ids, bus, slot, whole_slot)
    state = vm.table.state(key)
    if state is SlotState.UNPLUGGING:
        claim = vm.table.claim(key)
        raise Conflict(f"slot: {key[0]} slot {key[1]} is already unplugging "
                       f"({', '.join(claim.ids if claim else ())}); wait for it")
    if state not in (SlotState.PRESENT, SlotState.ORPHANED):
        raise Conflict(f"slot: {key[0]} slot {key[1]} is {state.value}")
    policy = vm.policies()[key[0]]
    all_ids = [m.id for m in members]
    targets = (policy.unplug_targets(members) if state is SlotState.PRESENT
               else policy.rollback_targets(members))
    # The slot is this detach's, and its deletions are awaited, before anything awaits:
    # the guest may eject it while the record is written (then there is nothing to send).
    vm.table.begin_unplug(key, all_ids)
    done = vm.tracker.expect(all_ids)
    started = time.monotonic()
    try:
        await fault_point("detach-recording")
        op = await vm.journal.begin(Operation(
            "detach", vm.name, key[0], key[1], {m.id: m.function for m in members},
            policy.name, durable=not policy.repeated_unplug_harmless))
        vm.table.recorded(key, op.id)
    except BaseException:
        done.cancel()
        vm.table.unplug_ended(key)
        raise
    metrics.phase("detach", "journal", time.monotonic() - started)
    await fault_point("detach-begin")
    return _Claimed(key, all_ids, targets, policy, op, done, started)


async def _send(vm: VmContext, c: _Claimed, limit: float, result: DetachResult) -> None:
    """The policy's device_del commands, a busy guest waited out until the deadline; a refusal
    ends the detach with the slot as it was."""
    def waiting(desc: str) -> None:
        c.op.waiting = f"{desc}; retrying"
        result.waited = round(time.monotonic() - c.started, 3)
        log.info("guest not ready for unplug; retrying", extra={
            "vm": vm.name, "bus": c.key[0], "slot": c.key[1], "error": desc})
    try:
        await execute_unplug(c.targets, c.done, vm.link, vm.tracker,
                             deadline=c.started + limit, on_wait=waiting)
    except QmpfdError:
        vm.table.unplug_ended(c.key)
        vm.journal.end(c.op)
        metrics.operation("detach", c.policy.name, "refused")
        raise
    finally:
        c.op.waiting = None


async def _released(c: _Claimed, limit: float, force: bool, result: DetachResult) -> bool:
    """Wait for the guest to release the slot: True once it has; False for a forced detach
    that returns first; Timeout past ``limit`` (the slot stays 'unplugging')."""
    limit = min(limit, FORCE_GRACE) if force else limit
    remaining = limit if force else max(0.0, c.started + limit - time.monotonic())
    try:
        await asyncio.wait_for(asyncio.shield(c.done), remaining)
    except TimeoutError:
        result.seconds = round(time.monotonic() - c.started, 3)
        if force:
            result.unplugging = True
            metrics.operation("detach", c.policy.name, "unplugging")
            return False
        metrics.operation("detach", c.policy.name, "timeout")
        raise Timeout(f"guest did not release {c.key[0]} slot {c.key[1]} within {limit:g} s; "
                      "the slot stays 'unplugging' and completes when QEMU reports "
                      "DEVICE_DELETED") from None
    return True


def resolve_slot(vm: VmContext, ids: Sequence[str] | None, bus: str | None, slot: int | None,
                 whole_slot: bool) -> tuple[SlotKey, list[SlotMember]]:
    table = vm.table
    if ids:
        keys = set()
        for i, dev_id in enumerate(ids):
            found = table.find(dev_id)
            if found is None:
                hint = " (it is queued: use pending-cancel)" \
                    if dev_id in vm.table.queued_ids() else ""
                raise NotFound(f"ids[{i}]: no device '{dev_id}' in this VM{hint}")
            keys.add(found)
        if len(keys) > 1:
            raise InvalidRequest("ids: the devices are in different slots; detach one slot "
                                 "per request")
        (key,) = keys
    elif bus is not None and slot is not None:
        key = (bus, slot)
    else:
        raise InvalidRequest("ids: give the ids to detach, or bus and slot")
    b = table.bus(key[0])
    if not b.hotpluggable:
        raise Unsupported(f"bus: '{key[0]}' does not support hot-unplug")
    table.check_slot_number(b, key[1])
    functions = table.functions(key)
    if not functions:
        raise NotFound(f"slot: {key[0]} slot {key[1]} is empty")
    anonymous = [f.driver for f in functions if f.id is None]
    if anonymous:
        raise Unsupported(f"slot: {key[0]} slot {key[1]} holds built-in devices "
                          f"({', '.join(anonymous)}) that cannot be unplugged")
    members = [SlotMember(f.id, f.function) for f in functions if f.id is not None]
    if ids and not whole_slot:
        others = sorted({m.id for m in members} - set(ids))
        if others:
            raise Conflict(f"ids: the slot also holds {', '.join(others)}; a multifunction "
                           "slot is removed whole: name all its ids or set whole-slot")
    return key, members
