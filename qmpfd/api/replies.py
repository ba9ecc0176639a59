"""Domain results -> wire JSON: the only place reply shapes are decided (contract.md)."""

from __future__ import annotations

import time
from typing import Any

from qmpfd.api.eventlog import Replay
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


def vm_added(info: VmInfo) -> dict[str, Any]:
    return {"name": info.name, "arch": info.arch, "machine": info.machine, "qemu": info.qemu,
            "policy": info.policy, "uuid": info.uuid}


def vm(info: VmInfo) -> dict[str, Any]:
    return {"name": info.name, "qmp": info.qmp, "connected": info.connected, "arch": info.arch,
            "machine": info.machine, "policy": info.policy, "qemu": info.qemu,
            "uuid": info.uuid}


def vm_removed(result: RemoveResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if result.host_released:
        out["host-released"] = result.host_released
    if result.host_held:
        out["host-held"] = result.host_held
    if result.settled:
        out["settled"] = [{"operation": st.flight.operation, "kind": st.flight.kind,
                           "bus": st.flight.bus, "slot": st.flight.slot,
                           "ids": list(st.flight.ids), "outcome": st.outcome,
                           **({"in-qemu": list(st.left)} if st.outcome.startswith("still")
                              else {})}
                          for st in result.settled]
    return out


def slots(views: list[SlotView]) -> list[dict[str, Any]]:
    return [{"bus": v.bus, "slot": v.slot, "hotpluggable": v.hotpluggable,
             "functions": [{"function": f.function, "id": f.id, "driver": f.driver,
                            "state": f.state.value} for f in v.functions]}
            for v in views]


def plan(vm_name: str, p: Plan) -> dict[str, Any]:
    return {
        "vm": vm_name, "bus": p.bus, "slot": p.slot, "policy": p.policy.name,
        "functions": [{"id": f.id, "function": f.function} for f in p.functions],
        "steps": [s.as_json() for s in p.steps],
        "rollback": [s.as_json() for s in p.rollback_steps(p.ids)],
    }


def attached(result: AttachResult) -> dict[str, Any]:
    out = plan(result.vm, result.plan)
    if result.dry_run:
        out["dry-run"] = True
    return out


def pending(vm_name: str, entry: PendingSlot) -> dict[str, Any]:
    return {
        "vm": vm_name, "bus": entry.bus, "slot": entry.slot,
        "functions": [{"function": f.function, "id": f.id, "driver": f.driver}
                      for f in sorted(entry.functions.values(), key=lambda f: f.function)],
        "expires-in": max(0.0, round(entry.expires_at - time.monotonic(), 1)),
    }


def function_added(result: QueuedResult | AttachResult) -> dict[str, Any]:
    if isinstance(result, QueuedResult):
        return {"queued": True, **pending(result.vm, result.entry)}
    return {"queued": False, **attached(result)}


def detached(result: DetachResult) -> dict[str, Any]:
    out: dict[str, Any] = {"vm": result.vm, "bus": result.bus, "slot": result.slot,
                           "ids": result.ids, "seconds": result.seconds}
    if result.unplugging:
        out["unplugging"] = True
    if result.waited:
        out["waited-for-guest"] = result.waited
    if result.host_released:
        out["host-released"] = result.host_released
    return out


def failed_operation(vm_name: str, e: EndedOperation) -> dict[str, Any]:
    return {"operation": e.operation, "kind": e.kind, "vm": vm_name, "bus": e.bus,
            "slot": e.slot, "ids": list(e.ids), "outcome": "failed", "reason": e.reason,
            "ended": e.ended}


def operation(op: Operation) -> dict[str, Any]:
    return {"operation": op.id, "kind": op.kind, "vm": op.vm, "bus": op.bus, "slot": op.slot,
            "ids": op.ids, "policy": op.policy, "started": op.started, "sent": op.sent,
            "age": round(time.time() - op.started, 1),
            **({"waiting": op.waiting} if op.waiting else {})}


def replay(r: Replay) -> dict[str, Any]:
    out: dict[str, Any] = {"boot": r.boot, "seq": r.last, "complete": r.complete,
                           "events": r.events}
    if r.reason:
        out["reason"] = r.reason
    return out
