"""Domain results -> wire JSON, through each command's reply model (:mod:`qmpfd.client.models`):
the server builds the very models the typed client reads, ``query-qmp-schema`` describes and
qmpfctl renders, and sends what it set (``exclude_unset``: a member it did not set is absent,
never ``null``), so the three cannot drift apart."""

from __future__ import annotations

import time
from typing import Any

from qmpfd.api.eventlog import Replay
from qmpfd.api.session import early_reply
from qmpfd.client import models as m
from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.plan import Plan
from qmpfd.hotplug.slotview import SlotView
from qmpfd.state.journal import Operation
from qmpfd.vm.results import (
    AttachResult,
    DetachResult,
    EndedOperation,
    QueuedResult,
    RemoveResult,
    VmInfo,
)


def wire(reply: m.Reply) -> dict[str, Any]:
    """The reply as sent: wire names (hyphens), only the members that were set."""
    return reply.model_dump(mode="json", by_alias=True, exclude_unset=True)


def vm_added(info: VmInfo) -> dict[str, Any]:
    return wire(m.Vm(name=info.name, arch=info.arch, machine=info.machine, qemu=info.qemu,
                     policy=info.policy, uuid=info.uuid))


def vm(info: VmInfo) -> dict[str, Any]:
    return wire(m.Vm(name=info.name, qmp=info.qmp, connected=info.connected, arch=info.arch,
                     machine=info.machine, policy=info.policy, qemu=info.qemu,
                     uuid=info.uuid))


def vm_removed(result: RemoveResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if result.host_released:
        out["host_released"] = result.host_released
    if result.host_held:
        out["host_held"] = result.host_held
    if result.settled:
        out["settled"] = [{"operation": st.flight.operation, "kind": st.flight.kind,
                           "bus": st.flight.bus, "slot": st.flight.slot,
                           "ids": list(st.flight.ids), "outcome": st.outcome,
                           **({"in-qemu": list(st.left)} if st.outcome.startswith("still")
                              else {})}
                          for st in result.settled]
    return wire(m.Removed(**out))


def slots(views: list[SlotView]) -> list[dict[str, Any]]:
    return [wire(m.Slot(bus=v.bus, slot=v.slot, hotpluggable=v.hotpluggable, functions=[
        m.SlotFunction(function=f.function, id=f.id, driver=f.driver, state=f.state.value)
        for f in v.functions])) for v in views]


def attached(result: AttachResult) -> dict[str, Any]:
    p: Plan = result.plan
    extra = {"dry_run": True} if result.dry_run else {}
    return wire(m.Attached(
        vm=result.vm, bus=p.bus, slot=p.slot, policy=p.policy.name,
        functions=[m.PlacedFunction(id=f.id, function=f.function) for f in p.functions],
        steps=[s.as_json() for s in p.steps],
        rollback=[s.as_json() for s in p.rollback_steps(p.ids)], **extra))


class PreparedAttached:
    """An attach's success reply, made while QEMU works on its device_adds (the event loop
    waits idle then: about 1.6 ms for one function here) instead of after QEMU's answer, on
    the path to the client's, and written to the client (:class:`~qmpfd.api.session.EarlyReply`)
    in the callback that read QEMU's acceptance (:meth:`plugged`). Used only for the plan it
    was made for; a plan made again (a retry on a fresh view) or no preparation at all: made
    on the spot, as before."""

    def __init__(self, vm: str) -> None:
        self._vm = vm
        self._for: Plan | None = None
        self._reply: dict[str, Any] = {}
        self._early = early_reply()

    def prepare(self, plan: Plan) -> None:
        self._for, self._reply = plan, attached(AttachResult(self._vm, plan))
        if self._early is not None:
            self._early.prepare(self._reply)

    @property
    def answers_early(self) -> bool:
        """Whether :meth:`plugged` can answer the client (a client's request, not a tenant's)."""
        return self._early is not None and self._early.allowed

    def plugged(self, plan: Plan) -> None:
        """QEMU accepted the plan's last device_add: the client is answered now."""
        if self._early is not None and self._for is plan:
            self._early.send()

    def reply(self, result: AttachResult) -> dict[str, Any]:
        if self._for is result.plan and not result.dry_run:
            return self._reply
        return attached(result)


def _queued_functions(entry: PendingSlot) -> list[m.PlacedFunction]:
    return [m.PlacedFunction(function=f.function, id=f.id, driver=f.driver)
            for f in sorted(entry.functions.values(), key=lambda f: f.function)]


def _expires_in(entry: PendingSlot) -> float:
    return max(0.0, round(entry.expires_at - time.monotonic(), 1))


def pending(vm_name: str, entry: PendingSlot) -> dict[str, Any]:
    return wire(m.Pending(vm=vm_name, bus=entry.bus, slot=entry.slot,
                          functions=[wire(f) for f in _queued_functions(entry)],
                          expires_in=_expires_in(entry)))


def function_added(result: QueuedResult | AttachResult) -> dict[str, Any]:
    if isinstance(result, QueuedResult):
        entry = result.entry
        return wire(m.Attached(queued=True, vm=result.vm, bus=entry.bus, slot=entry.slot,
                               functions=_queued_functions(entry),
                               expires_in=_expires_in(entry)))
    return {"queued": False, **attached(result)}


def detached(result: DetachResult) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if result.unplugging:
        extra["unplugging"] = True
    if result.waited:
        extra["waited_for_guest"] = result.waited
    if result.host_released:
        extra["host_released"] = result.host_released
    return wire(m.Detached(vm=result.vm, bus=result.bus, slot=result.slot, ids=result.ids,
                           seconds=result.seconds, **extra))


def failed_operation(vm_name: str, e: EndedOperation) -> dict[str, Any]:
    return wire(m.Operation(operation=e.operation, kind=e.kind, vm=vm_name, bus=e.bus,
                            slot=e.slot, ids=list(e.ids), outcome="failed", reason=e.reason,
                            ended=e.ended))


def operation(op: Operation) -> dict[str, Any]:
    extra = {"waiting": op.waiting} if op.waiting else {}
    return wire(m.Operation(operation=op.id, kind=op.kind, vm=op.vm, bus=op.bus, slot=op.slot,
                            ids=list(op.ids), policy=op.policy, started=op.started,
                            sent=op.sent, age=round(time.time() - op.started, 1), **extra))


def replay(r: Replay) -> dict[str, Any]:
    extra = {"reason": r.reason} if r.reason else {}
    return wire(m.Replay(boot=r.boot, seq=r.last, complete=r.complete,
                         events=[m.Event.model_validate(e) for e in r.events], **extra))
