"""Carrying out :func:`qmpfd.hotplug.recovery.decide` for every journaled operation of a VM, after
a restart or a reconnect, against the topology just read from QEMU."""

from __future__ import annotations

import contextlib
import logging
import time

from qmpfd.errors import QemuError, Timeout
from qmpfd.hotplug.executor import send_when_ready
from qmpfd.hotplug.policies import POLICIES
from qmpfd.hotplug.policies.base import SlotMember
from qmpfd.hotplug.recovery import Action, decide
from qmpfd.vm.context import VmContext
from qmpfd.vm.unplug import Unplug

log = logging.getLogger("qmpfd.vm")


async def reconcile(vm: VmContext) -> None:
    """Finish or undo what the journal says was in flight, against what QEMU holds now."""
    ops = vm.journal.for_vm(vm.name)
    if not ops:
        return
    present = vm.table.topology.device_ids()
    policies = vm.policies()
    for op in ops:
        decision = decide(op, present)
        if op.kind == "detach" and decision.ids and await _cold_plugged(vm, decision.ids):
            # QEMU was started again with these devices on its command line (a management
            # plane restarting the VM from its config): no unplug is pending in this QEMU.
            vm.journal.end(op)
            vm.operation_failed(op, "QEMU restarted with these devices on its command line; "
                                    "the unplug did not survive the restart (the slot is "
                                    "present: detach it again)", recovered=True)
            continue
        key = (op.bus, op.slot)
        log.info("reconciling", extra={"vm": vm.name, "operation": op.id,
                                       "kind": op.kind, "action": decision.action.value})
        members = [SlotMember(i, op.functions[i]) for i in decision.ids]
        policy = policies.get(op.bus) or POLICIES.get(op.policy)
        if decision.action is Action.COMPLETED:
            vm.journal.end(op)
            vm.events.attached(op.bus, op.slot, op.ids, recovered=True)
        elif decision.action is Action.FORGET:
            vm.journal.end(op)
            await vm.removed(op.ids)
            vm.events.attach_failed(op.bus, op.slot, op.ids,
                                    "interrupted; nothing of it is in QEMU", recovered=True)
        elif decision.action is Action.DETACHED:
            vm.journal.end(op)
            await vm.removed(op.ids)
            vm.events.detached(op.bus, op.slot, op.ids, recovered=True)
        elif decision.action in (Action.ROLL_BACK, Action.SEND_UNPLUG) and policy:
            targets = (policy.rollback_targets(members) if op.kind == "attach"
                       else policy.unplug_targets(members))
            vm.table.wait_unplug(key, list(decision.ids), op.id)
            done = vm.tracker.expect(decision.ids)  # before device_del: events are fast
            deadline = time.monotonic() + (policy.timeouts.unplug if policy else 30.0)
            for target in targets:
                with contextlib.suppress(QemuError, Timeout):
                    await send_when_ready(vm.link, "device_del", {"id": target}, deadline)
            vm.journal.mark_sent(op)
            Unplug(vm, key, list(decision.ids), op, attach=op.kind == "attach",
                   done=done, recovered=True).watch()
        else:  # KEEP_WAITING (or no policy known for the bus any more)
            vm.table.wait_unplug(key, list(decision.ids), op.id)
            Unplug(vm, key, list(decision.ids), op, attach=op.kind == "attach",
                   recovered=True).watch()


async def _cold_plugged(vm: VmContext, ids: tuple[str, ...]) -> bool:
    """Whether every one of ``ids`` was created at QEMU's start, not hot-plugged (QOM property
    ``hotplugged``): then this is a new QEMU and nothing is being unplugged."""
    for dev_id in ids:
        try:
            hot = await vm.link.execute("qom-get", {"path": f"/machine/peripheral/{dev_id}",
                                                    "property": "hotplugged"})
        except QemuError:
            return False
        if hot is not False:
            return False
    return True
