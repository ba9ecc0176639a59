"""Attach of one VM's slot: plan under the allocation lock, journal, execute, and move the slot
through its states (:mod:`qmpfd.hotplug.slots`). Detach is :mod:`qmpfd.vm.detach`.

Each operation is journaled before QEMU is touched, synced where a crash could leave a state
QEMU cannot tell (:mod:`qmpfd.state.journal`); the journal's "end" is not waited for. The
client may be answered from the callback that read QEMU's acceptance (``on_plugged``), before
the slot's bookkeeping here. Host functions held for an attach are given back once, by whoever
sees the slot's functions leave QEMU (:class:`~qmpfd.vm.unplug.Unplug`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from qmpfd import metrics
from qmpfd.errors import (
    QemuError,
    QmpfdError,
    Timeout,
    VmGone,
)
from qmpfd.faults import fault_point
from qmpfd.hotplug.executor import AttachFailed, execute_attach, rollback
from qmpfd.hotplug.plan import FunctionSpec, Plan, plan_attach
from qmpfd.hotplug.slots import Slot
from qmpfd.qemu.topology import creates_bus
from qmpfd.state.journal import Operation
from qmpfd.vm.context import VmContext
from qmpfd.vm.results import AttachResult
from qmpfd.vm.unplug import Unplug

log = logging.getLogger("qmpfd.vm")


def plan_and_reserve(vm: VmContext, functions: Sequence[FunctionSpec], bus: str | None,
                     slot: int | None, timeout: float | None) -> Plan:
    """Under ``vm.alloc`` (or while nobody holds it: this never awaits): the plan, with its
    slot claimed (ATTACHING) in the table."""
    plan = plan_attach(vm.table, functions, vm.policies(), bus=bus, slot=slot,
                       from_top=vm.slots_from_top, now=time.monotonic())
    vm.table.reserve((plan.bus, plan.slot), plan.ids)
    if timeout is not None:
        plan = Plan(plan.bus, plan.slot, plan.policy.with_timeouts(timeout, None),
                    plan.functions, plan.steps)
    return plan


#: told the plan once its first device_adds are written, while QEMU works on them
WhileQemuWorks = Callable[[Plan], None]
#: told the plan in the callback that read QEMU's acceptance of its last device_add: the
#: attach has succeeded in QEMU, before anything else runs (see :func:`run_attach`)
OnPlugged = Callable[[Plan], None]


async def attach(vm: VmContext, functions: Sequence[FunctionSpec], *, bus: str | None = None,
                 slot: int | None = None, dry_run: bool = False,
                 timeout: float | None = None,
                 acquire: Callable[[], Awaitable[None]] | None = None,
                 while_qemu_works: WhileQemuWorks | None = None,
                 on_plugged: OnPlugged | None = None) -> AttachResult:
    """Attach ``functions`` as one slot. ``acquire``: bind the host functions the attach passes
    through (and journal them as held) first; this operation then gives them back, through the
    VM's one release path, whenever the attach leaves nothing of them in QEMU.
    ``while_qemu_works``: work for the caller in the wait for QEMU's answer (the loop is idle
    then), such as its reply for the plan: done there, it is off the path from QEMU's answer
    to the client's. ``on_plugged``: see :func:`run_attach`."""
    if dry_run:
        async with vm.alloc:
            plan = plan_attach(vm.table, functions, vm.policies(), bus=bus, slot=slot,
                               from_top=vm.slots_from_top)
        return AttachResult(vm.name, plan, dry_run=True)
    if acquire is None:
        return await _attach(vm, functions, bus, slot, timeout, while_qemu_works, on_plugged)
    await acquire()
    ids = [f.id for f in functions]
    try:
        return await _attach(vm, functions, bus, slot, timeout, while_qemu_works, on_plugged)
    except AttachFailed as exc:
        # Still in QEMU (given back once QEMU deletes them), or not known yet (given back by
        # the reconnect's reconcile if nothing of them is there): not now.
        if not exc.rollback.left and not isinstance(exc.cause, VmGone):
            await vm.removed(ids)
        raise
    except BaseException:
        await vm.removed(ids)
        raise


async def _attach(vm: VmContext, functions: Sequence[FunctionSpec], bus: str | None,
                  slot: int | None, timeout: float | None,
                  while_qemu_works: WhileQemuWorks | None,
                  on_plugged: OnPlugged | None) -> AttachResult:
    if vm.alloc.locked():
        async with vm.alloc:
            plan = plan_and_reserve(vm, functions, bus, slot, timeout)
    else:   # nobody holds it, and planning never awaits: nothing can come between
        plan = plan_and_reserve(vm, functions, bus, slot, timeout)
    try:
        await run_attach(vm, plan, retry_if_stale=True, while_qemu_works=while_qemu_works,
                         on_plugged=on_plugged)
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
        await run_attach(vm, plan, while_qemu_works=while_qemu_works, on_plugged=on_plugged)
    return AttachResult(vm.name, plan)


def _may_be_stale(exc: AttachFailed) -> bool:
    """A refusal by QEMU, fully undone: it may come from an out-of-date view of the VM."""
    return isinstance(exc.cause, QemuError) and not exc.rollback.left


async def _view_was_stale(vm: VmContext, plan: Plan) -> bool:
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


async def run_attach(vm: VmContext, plan: Plan, *, retry_if_stale: bool = False,
                     while_qemu_works: WhileQemuWorks | None = None,
                     on_plugged: OnPlugged | None = None) -> None:
    """Execute a reserved plan: journal, plug, and settle the slot's state either way.

    ``retry_if_stale``: the caller plans again if QEMU refused because qmpfd's view was stale,
    so a fully undone refusal is not announced here: the caller announces it if it does not
    retry (the client sees one outcome). ``while_qemu_works``: see :func:`attach`.

    ``on_plugged``: told the plan in the socket's callback that read QEMU's acceptance of the
    last device_add, where the attach has succeeded in QEMU (the caller answers its client
    there: the slot's bookkeeping, its journal end and its event follow, before any request
    that answer could prompt is read). Not for a plan that brings a bus: that bus is read
    from QEMU before the attach returns.
    """
    key = (plan.bus, plan.slot)
    owner = vm.table.claim(key)      # this attach's work on the slot (reserved with the plan)
    op = await _journaled(vm, plan, owner)
    journaled = time.monotonic()
    loop = asyncio.get_running_loop()
    if log.isEnabledFor(logging.DEBUG):     # its arguments are not made otherwise
        log.debug("attach", extra={"vm": vm.name, "bus": plan.bus, "slot": plan.slot,
                                  "ids": plan.ids})
    if while_qemu_works is not None:
        # Runs at the loop's next turn: after the first device_adds are written (the
        # executor writes before it first waits), long before QEMU's answer can be read.
        loop.call_soon(while_qemu_works, plan)
    brings_bus = any([creates_bus(str(s.arguments["driver"])) for s in plan.steps])
    try:
        await fault_point("attach-begin")
        await execute_attach(plan, vm.link, vm.tracker, vm.table,
                             after_step=lambda n: fault_point(f"attach-step-{n}"),
                             on_plugged=(functools.partial(on_plugged, plan)
                                         if on_plugged is not None and not brings_bus
                                         else None))
    except AttachFailed as exc:
        failure = _failed(vm, plan, op, exc, owner,
                          announce=not (retry_if_stale and _may_be_stale(exc)))
        if failure is exc:
            raise
        raise failure from exc
    except BaseException:
        vm.table.attach_undone(key, [], owner)
        vm.journal.end(op)
        raise
    await _succeeded(vm, plan, op, owner, journaled)
    if brings_bus:
        async with vm.alloc:
            await vm.refresh()   # a bridge or port brings a bus qmpfd must learn


async def _succeeded(vm: VmContext, plan: Plan, op: Operation, owner: Slot | None,
                     journaled: float) -> None:
    vm.table.attach_done((plan.bus, plan.slot), owner)
    vm.journal.end(op)
    await fault_point("attach-ended")
    asyncio.get_running_loop().call_soon(_count_attach, plan.policy.name,
                                         time.monotonic() - journaled)
    vm.events.attached(plan.bus, plan.slot, plan.ids)


async def _journaled(vm: VmContext, plan: Plan, owner: Slot | None) -> Operation:
    """The attach's operation, recorded (after the slot's reuse delay); the slot given back
    if it cannot be."""
    key = (plan.bus, plan.slot)
    op = Operation("attach", vm.name, plan.bus, plan.slot,
                   {f.id: f.function for f in plan.functions}, plan.policy.name,
                   durable=len(plan.functions) > 1)
    started = time.monotonic()
    try:
        # A slot just emptied waits out its reuse delay (no sleep(0) otherwise: a loop turn).
        if delay := vm.table.held_back(key, started):
            await asyncio.sleep(delay)
        await vm.journal.begin(op)   # 2+ functions: synced first (qmpfd.state.journal)
        vm.table.recorded(key, op.id)
    except BaseException:
        vm.table.attach_undone(key, [], owner)
        metrics.operation("attach", plan.policy.name, "refused")
        raise
    # counted at the next turn: off the request's path
    asyncio.get_running_loop().call_soon(metrics.phase, "attach", "journal",
                                         time.monotonic() - started)
    return op


def _count_attach(policy: str, qemu_seconds: float) -> None:
    metrics.phase("attach", "qemu", qemu_seconds)
    metrics.operation("attach", policy, "ok")


def _failed(vm: VmContext, plan: Plan, op: Operation, exc: AttachFailed, owner: Slot | None,
            *, announce: bool) -> AttachFailed:
    """Settle the slot, the record and the announcement of a failed attach; the error to give
    the client. ``announce``: False when the caller may plan again (it announces then)."""
    key = (plan.bus, plan.slot)
    if exc.rollback.unknown:
        metrics.operation("attach", plan.policy.name, "unknown")
        vm.spawn(_undo_when_qemu_answers(vm, plan, op, exc.rollback.left, owner), "undo")
        return AttachFailed(Timeout(exc.desc), (
            f"{exc.desc}; QEMU stopped answering, so which functions of the slot it holds "
            "is not known yet: the operation stays in flight (query-operations), is "
            "rolled back once QEMU answers, and SLOT_ATTACH_FAILED says so"), exc.rollback)
    if isinstance(exc.cause, VmGone):
        # The record stays: on reconnect QEMU is read again and reconcile finishes or undoes
        # the attach and announces which (recovered: true). Nothing is announced now: the
        # outcome is not known yet, and QEMU may have carried the attach out.
        metrics.operation("attach", plan.policy.name, "unknown")
        vm.table.attach_undone(key, [], owner)
        return AttachFailed(exc.cause, (
            f"{exc.desc}; what QEMU holds of the slot is not known yet: the operation stays in "
            "flight and is finished or rolled back when qmpfd reconnects (SLOT_ATTACHED or "
            "SLOT_ATTACH_FAILED, recovered: true)"), exc.rollback)
    metrics.operation("attach", plan.policy.name,
                      "rolled-back" if not exc.rollback.left else "rollback-pending")
    if announce:
        vm.events.attach_failed(plan.bus, plan.slot, plan.ids, exc.desc)
    if not vm.table.holds(key, owner):
        return exc                   # recovery took the slot over: it ends the operation
    if exc.rollback.left:
        vm.table.attach_undone(key, exc.rollback.left, owner)
        vm.journal.mark_sent(op)
        Unplug(vm, key, exc.rollback.left, op, attach=True).watch()
    else:
        vm.table.attach_undone(key, [], owner)
        vm.journal.end(op)
    return exc


UNKNOWN_RETRY = 2.0     # seconds between attempts to learn what a stalled QEMU holds


async def _undo_when_qemu_answers(vm: VmContext, plan: Plan, op: Operation,
                                  ids: Sequence[str], owner: Slot | None) -> None:
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
    if not vm.table.holds(key, owner):
        return           # a reconnect's recovery took the slot over and ends the operation
    if result.left:      # the guest has not let go yet (or the link is gone: reconcile)
        vm.table.attach_undone(key, result.left, owner)
        vm.journal.mark_sent(op)
        Unplug(vm, key, result.left, op, attach=True).watch()
        return
    vm.table.attach_undone(key, [], owner)
    vm.journal.end(op)
    await vm.removed(plan.ids)
    vm.events.attach_failed(plan.bus, plan.slot, plan.ids, reason)
