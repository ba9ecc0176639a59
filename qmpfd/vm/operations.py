"""Attach and detach of one VM's slots: plan under the allocation lock, journal, execute, and
move the slot through its states (:mod:`qmpfd.hotplug.slots`).

Each operation is journaled (synced) before QEMU is touched; the journal's "end" is not waited
for. Host functions held for an attach are given back once, by whoever sees the slot's functions
leave QEMU (:meth:`Unplug.finish`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qmpfd import metrics
from qmpfd.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QemuError,
    QmpfdError,
    Timeout,
    Unsupported,
    VmGone,
)
from qmpfd.faults import fault_point
from qmpfd.hotplug.executor import AttachFailed, execute_attach, execute_unplug, rollback
from qmpfd.hotplug.plan import FunctionSpec, Plan, plan_attach
from qmpfd.hotplug.policies.base import SlotMember
from qmpfd.hotplug.slots import SlotKey, SlotState
from qmpfd.qemu.topology import creates_bus
from qmpfd.state.journal import Operation
from qmpfd.vm.results import AttachResult, DetachResult

if TYPE_CHECKING:
    from qmpfd.vm.managed import ManagedVm

log = logging.getLogger("qmpfd.vm")

FORCE_GRACE = 1.0       # a forced detach still waits this long for an immediate completion


def plan_and_reserve(vm: ManagedVm, functions: Sequence[FunctionSpec], bus: str | None,
                     slot: int | None, timeout: float | None) -> Plan:
    """Under ``vm.alloc``: the plan, with its slot claimed (ATTACHING) in the table."""
    plan = plan_attach(vm.table, functions, vm.policies(), bus=bus, slot=slot,
                       from_top=vm.slots_from_top, now=time.monotonic())
    vm.table.reserve((plan.bus, plan.slot), plan.ids)
    if timeout is not None:
        plan = Plan(plan.bus, plan.slot, plan.policy.with_timeouts(timeout, None),
                    plan.functions, plan.steps)
    return plan


async def attach(vm: ManagedVm, functions: Sequence[FunctionSpec], *, bus: str | None = None,
                 slot: int | None = None, dry_run: bool = False,
                 timeout: float | None = None) -> AttachResult:
    """Attach ``functions`` as one slot."""
    async with vm.alloc:
        if dry_run:
            plan = plan_attach(vm.table, functions, vm.policies(), bus=bus, slot=slot,
                               from_top=vm.slots_from_top)
            return AttachResult(vm.name, plan, dry_run=True)
        plan = plan_and_reserve(vm, functions, bus, slot, timeout)
    try:
        await run_attach(vm, plan, retry_if_stale=True)
    except AttachFailed as exc:
        if not _may_be_stale(exc):
            raise
        async with vm.alloc:
            if not await _view_was_stale(vm, plan):
                vm.events.attach_failed(plan.bus, plan.slot, plan.ids, exc.desc)
                raise
            # QEMU refused because something changed behind qmpfd's back: plan once more on
            # the view just read (the new plan picks another slot, or says clearly why not).
            log.info("QEMU's view differed from qmpfd's; planning again on what QEMU holds",
                     extra={"vm": vm.name, "error": exc.desc})
            plan = plan_and_reserve(vm, functions, bus, slot, timeout)
        await run_attach(vm, plan)
    return AttachResult(vm.name, plan)


def _may_be_stale(exc: AttachFailed) -> bool:
    """A refusal by QEMU, fully undone: it may come from an out-of-date view of the VM."""
    return isinstance(exc.cause, QemuError) and not exc.rollback.left


async def _view_was_stale(vm: ManagedVm, plan: Plan) -> bool:
    """Under ``vm.alloc``: read QEMU again and tell whether the plan's slot or one of its ids
    was taken behind qmpfd's back. Decided from QEMU's topology, not from the wording of the
    refusal, which differs between QEMU versions."""
    try:
        await vm.refresh()
    except QmpfdError:
        return False
    topology = vm.table.topology
    target = topology.bus(plan.bus)
    return (target is None or not target.slot(plan.slot).empty
            or bool(topology.device_ids() & set(plan.ids)))


async def run_attach(vm: ManagedVm, plan: Plan, *, retry_if_stale: bool = False) -> None:
    """Execute a reserved plan: journal, plug, and settle the slot's state either way.

    ``retry_if_stale``: the caller plans again if QEMU refused because qmpfd's view was stale,
    so a fully undone refusal is not announced here: the caller announces it if it does not
    retry (the client sees one outcome).
    """
    key = (plan.bus, plan.slot)
    op = Operation("attach", vm.name, plan.bus, plan.slot,
                   {f.id: f.function for f in plan.functions}, plan.policy.name)
    started = time.monotonic()
    try:
        # The slot is ours (ATTACHING); a slot just emptied waits out its reuse delay.
        await asyncio.sleep(vm.table.held_back(key, started))
        await vm.journal.begin(op)   # synced before QEMU is touched: a crash leaves a record
    except BaseException:
        vm.table.attach_undone(key, [])
        metrics.operation("attach", plan.policy.name, "refused")
        raise
    metrics.phase("attach", "journal", time.monotonic() - started)
    started = time.monotonic()
    log.info("attach", extra={"vm": vm.name, "bus": plan.bus, "slot": plan.slot,
                              "ids": plan.ids})
    try:
        await fault_point("attach-begin")
        await execute_attach(plan, vm.link, vm.tracker, vm.table,
                             after_step=lambda n: fault_point(f"attach-step-{n}"))
    except AttachFailed as exc:
        if exc.rollback.unknown:
            metrics.operation("attach", plan.policy.name, "unknown")
            vm.spawn(_undo_when_qemu_answers(vm, plan, op, exc.rollback.left), "undo")
            raise AttachFailed(Timeout(exc.desc), (
                f"{exc.desc}; QEMU stopped answering, so which functions of the slot it holds "
                "is not known yet: the operation stays in flight (query-operations), is "
                "rolled back once QEMU answers, and SLOT_ATTACH_FAILED says so"),
                exc.rollback) from exc
        metrics.operation("attach", plan.policy.name,
                          "rolled-back" if not exc.rollback.left else "rollback-pending")
        if not (retry_if_stale and _may_be_stale(exc)):   # the caller decides and announces
            vm.events.attach_failed(plan.bus, plan.slot, plan.ids, exc.desc)
        if isinstance(exc.cause, VmGone):
            vm.table.attach_undone(key, [])  # reconnect re-reads QEMU; reconcile settles it
        elif exc.rollback.left:
            vm.table.attach_undone(key, exc.rollback.left)
            vm.journal.mark_sent(op)
            Unplug(vm, key, exc.rollback.left, op, attach=True).watch()
        else:
            vm.table.attach_undone(key, [])
            vm.journal.end(op)
        raise
    except BaseException:
        vm.table.attach_undone(key, [])
        vm.journal.end(op)
        raise
    vm.table.attach_done(key)
    vm.journal.end(op)
    metrics.phase("attach", "qemu", time.monotonic() - started)
    metrics.operation("attach", plan.policy.name, "ok")
    vm.events.attached(plan.bus, plan.slot, plan.ids)
    if any(creates_bus(str(s.arguments["driver"])) for s in plan.steps):
        async with vm.alloc:
            await vm.refresh()   # a bridge or port brings a bus qmpfd must learn


UNKNOWN_RETRY = 2.0     # seconds between attempts to learn what a stalled QEMU holds


async def _undo_when_qemu_answers(vm: ManagedVm, plan: Plan, op: Operation,
                                  ids: Sequence[str]) -> None:
    """QEMU's monitor stopped answering mid-attach: any of ``ids`` may or may not be in QEMU.
    Keep asking until it answers; then take back whichever it holds, end the operation (its
    slot stays ATTACHING until then) and announce the outcome."""
    key = (plan.bus, plan.slot)
    while True:
        result = await rollback(plan, [], list(ids), vm.link, vm.tracker, vm.table)
        if not result.unknown:
            break
        await asyncio.sleep(UNKNOWN_RETRY)
    reason = "QEMU stopped answering mid-attach; rolled back once it answered"
    if result.left:      # the guest has not let go yet (or the link is gone: reconcile)
        vm.table.attach_undone(key, result.left)
        vm.journal.mark_sent(op)
        Unplug(vm, key, result.left, op, attach=True).watch()
        return
    vm.table.attach_undone(key, [])
    vm.journal.end(op)
    await vm.removed(plan.ids)
    vm.events.attach_failed(plan.bus, plan.slot, plan.ids, reason)


@dataclass
class Unplug:
    """One slot on its way out of QEMU: ends when every id has had its DEVICE_DELETED."""

    vm: ManagedVm
    key: SlotKey
    ids: list[str]
    op: Operation | None
    attach: bool = False                 # a rollback (no SLOT_DETACHED at the end)
    started: float = 0.0
    done: asyncio.Future[None] | None = None
    answered: bool = False               # the detach request reports the give-back itself

    def watch(self) -> asyncio.Future[None]:
        self.started = self.started or time.monotonic()
        fut = self.done if self.done is not None else self.vm.tracker.expect(self.ids)
        self.done = fut
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, f: asyncio.Future[None]) -> None:
        vm = self.vm
        vm.table.unplug_ended(self.key)
        if f.cancelled():
            return
        exc = f.exception()
        if exc is not None:
            # Lost connection: the journal keeps op and reconcile() resumes the wait.
            # Guest refusal: the functions stay (the slot is present again); the operation is
            # over, and a client that is no longer waiting learns it from the event.
            log.warning("unplug failed", extra={"vm": vm.name, "error": str(exc)})
            if self.op is not None and not isinstance(exc, VmGone):
                vm.journal.end(self.op)
                vm.operation_failed(self.op, str(exc))
            return
        if self.op is not None:
            vm.journal.end(self.op)
        if not self.answered:
            vm.spawn(vm.removed(self.ids), "release")
        if self.attach:
            vm.events.attach_failed(self.key[0], self.key[1], self.ids,
                                    "interrupted; rolled back")
        else:
            vm.events.detached(self.key[0], self.key[1], self.ids,
                               seconds=round(time.monotonic() - self.started, 3))


async def detach(vm: ManagedVm, *, ids: Sequence[str] | None, bus: str | None,
                 slot: int | None, whole_slot: bool, timeout: float | None,
                 force: bool = False) -> DetachResult:
    """Unplug a whole slot and wait for every DEVICE_DELETED.

    ``force``: for a guest that cannot answer (paused, no OS): send the unplug request and
    return at once with the slot 'unplugging' instead of waiting; QEMU completes it as soon
    as it can (at once where no guest is needed, otherwise when the guest runs).
    """
    async with vm.alloc:
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
                policy.name))
        except BaseException:
            done.cancel()
            vm.table.unplug_ended(key)
            raise
        metrics.phase("detach", "journal", time.monotonic() - started)
        await fault_point("detach-begin")
    # device_del goes out after the allocation lock is let go: a guest still busy with the
    # slot is waited out here (retried until the deadline) without holding up other slots.
    limit = timeout if timeout is not None else policy.timeouts.unplug
    result = DetachResult(vm.name, key[0], key[1], all_ids, 0.0)

    def waiting(desc: str) -> None:
        op.waiting = f"{desc}; retrying"
        result.waited = round(time.monotonic() - started, 3)
        log.info("guest not ready for unplug; retrying", extra={
            "vm": vm.name, "bus": key[0], "slot": key[1], "error": desc})
    try:
        await execute_unplug(targets, done, vm.link, vm.tracker,
                             deadline=started + limit, on_wait=waiting)
    except QmpfdError:
        vm.table.unplug_ended(key)
        vm.journal.end(op)
        metrics.operation("detach", policy.name, "refused")
        raise
    finally:
        op.waiting = None
    sent = time.monotonic()
    metrics.phase("detach", "qemu", sent - started)
    vm.journal.mark_sent(op)
    await fault_point("detach-sent")
    unplug = Unplug(vm, key, all_ids, op, started=started, done=done)
    unplug.watch()
    if force:
        limit = min(limit, FORCE_GRACE)
    remaining = max(0.0, started + limit - time.monotonic()) if not force else limit
    try:
        await asyncio.wait_for(asyncio.shield(done), remaining)
    except TimeoutError:
        result.seconds = round(time.monotonic() - started, 3)
        if force:
            result.unplugging = True
            metrics.operation("detach", policy.name, "unplugging")
            return result
        metrics.operation("detach", policy.name, "timeout")
        raise Timeout(f"guest did not release {key[0]} slot {key[1]} within {limit:g} s; "
                      "the slot stays 'unplugging' and completes when QEMU reports "
                      "DEVICE_DELETED") from None
    unplug.answered = True
    result.seconds = round(time.monotonic() - started, 3)
    metrics.phase("detach", "guest", time.monotonic() - sent)
    metrics.operation("detach", policy.name, "ok")
    result.host_released = await vm.removed(all_ids)
    return result


def resolve_slot(vm: ManagedVm, ids: Sequence[str] | None, bus: str | None, slot: int | None,
                 whole_slot: bool) -> tuple[SlotKey, list[SlotMember]]:
    table = vm.table
    if ids:
        keys = set()
        for i, dev_id in enumerate(ids):
            found = table.find(dev_id)
            if found is None:
                hint = " (it is queued: use pending-cancel)" \
                    if dev_id in vm.pending.ids() else ""
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
