"""A VM under qmpfd's management: its connection, its slots and the operations on them.

Concurrency rules (why they are what they are):
- Slot choice happens under the VM's allocation lock, and the chosen slot is reserved before the
  lock is released, so two attaches never get the same slot even though QEMU shows neither yet.
- One operation per slot at a time: a slot that is attaching, queued or unplugging is not offered to
  anyone else, and a second detach of an unplugging slot is refused (on native PCIe a second
  attention-button press would cancel the first).
- Operations on different slots, and on different VMs, run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qmpfd.errors import Conflict, InvalidRequest, NotFound, QemuError, Timeout, Unsupported
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.executor import AttachFailed, execute_attach, execute_unplug
from qmpfd.hotplug.pending import PendingQueues, PendingSlot, SlotKey
from qmpfd.hotplug.plan import FunctionSpec, plan_attach
from qmpfd.hotplug.policies import Policy, policy_for, vm_policy_name
from qmpfd.hotplug.policies.base import SlotMember
from qmpfd.vm.connection import VmConnection
from qmpfd.vm.introspect import VmIdentity, find_root_buses, read_identity, read_topology
from qmpfd.vm.topology import Topology

log = logging.getLogger("qmpfd.vm")

Emit = Callable[[str, dict[str, Any]], None]


class ManagedVm:
    def __init__(self, name: str, qmp: Path, emit: Emit, *, command_timeout: float,
                 pending_ttl: float, policies: dict[str, Policy] | None = None) -> None:
        self.name = name
        self.qmp = qmp
        self._emit = emit
        self._pending_ttl = pending_ttl
        self._policy_table = policies
        self.conn = VmConnection(name, qmp, command_timeout)
        self.tracker = DeletionTracker()
        self.conn.subscribe(self.tracker.handle_event)
        self.identity: VmIdentity | None = None
        self._roots: list[tuple[str, str, str, str]] | None = None
        self._alloc = asyncio.Lock()
        self._attaching: set[SlotKey] = set()
        self._unplugging: dict[SlotKey, list[str]] = {}
        self.pending = PendingQueues()
        self._expiry: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, connect_timeout: float) -> dict[str, Any]:
        await self.conn.connect(connect_timeout)
        try:
            self.identity = await read_identity(self.conn)
            self._roots = await find_root_buses(self.conn)
            topo = await self.topology()
        except BaseException:
            await self.conn.close()
            raise
        self._expiry = asyncio.create_task(self._expire_queues(), name=f"expiry-{self.name}")
        return {"name": self.name, "arch": self.identity.arch, "machine": self.identity.machine,
                "qemu": self.identity.qemu, "policy": self.policy_name(topo)}

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.conn.close()

    # -- facts -----------------------------------------------------------------------------
    async def topology(self) -> Topology:
        return await read_topology(self.conn, self._roots)

    def _ident(self) -> VmIdentity:
        assert self.identity is not None, "start() sets the identity"
        return self.identity

    def policies(self, topo: Topology) -> dict[str, Policy]:
        ident = self._ident()
        return {b.name: policy_for(ident.arch, ident.machine, b.mechanism, self._policy_table)
                for b in topo.buses}

    def policy_name(self, topo: Topology) -> str:
        ident = self._ident()
        return vm_policy_name(ident.arch, ident.machine, topo.mechanisms())

    def describe(self, topo: Topology | None = None) -> dict[str, Any]:
        ident = self.identity
        return {"name": self.name, "qmp": str(self.qmp), "connected": self.conn.connected,
                "arch": ident.arch if ident else None,
                "machine": ident.machine if ident else None,
                "qemu": ident.qemu if ident else None,
                "policy": self.policy_name(topo) if topo and ident else None}

    def _taken(self) -> set[SlotKey]:
        return self._attaching | self.pending.keys() | set(self._unplugging)

    async def query_slots(self) -> list[dict[str, Any]]:
        topo = await self.topology()
        out = []
        for s in topo.slots():
            key = (s.bus, s.slot)
            state = "unplugging" if key in self._unplugging else "present"
            funcs: list[dict[str, Any]] = [
                {"function": f.function, "id": f.id, "driver": f.driver, "state": state}
                for f in s.functions]
            queued = self.pending.get(key)
            if queued is not None:
                funcs += [{"function": f.function, "id": f.id, "driver": f.driver,
                           "state": "queued"} for f in queued.functions.values()]
            out.append({"bus": s.bus, "slot": s.slot, "hotpluggable": s.hotpluggable,
                        "functions": sorted(funcs, key=lambda f: int(f["function"]))})
        return out

    # -- attach ----------------------------------------------------------------------------
    async def attach(self, functions: Sequence[FunctionSpec], *, bus: str | None = None,
                     slot: int | None = None, dry_run: bool = False,
                     timeout: float | None = None, own: SlotKey | None = None,
                     ) -> dict[str, Any]:
        """Attach ``functions`` as one slot. ``own`` is a slot the caller already reserved."""
        async with self._alloc:
            topo = await self.topology()
            plan = plan_attach(topo, functions, self.policies(topo), bus=bus, slot=slot,
                               taken=self._taken() - {own}, busy_ids=self.pending.ids())
            if dry_run:
                return {**plan.describe(self.name), "dry-run": True}
            key = (plan.bus, plan.slot)
            self._attaching.add(key)
        if timeout is not None:
            plan = type(plan)(plan.bus, plan.slot, plan.policy.with_timeouts(timeout, None),
                              plan.functions, plan.steps)
        try:
            log.info("attach", extra={"vm": self.name, "bus": plan.bus, "slot": plan.slot,
                                      "ids": plan.ids})
            await execute_attach(plan, self.conn, self.tracker)
        except AttachFailed as exc:
            self._emit("SLOT_ATTACH_FAILED", {"vm": self.name, "bus": plan.bus,
                                              "slot": plan.slot, "ids": plan.ids,
                                              "reason": exc.desc})
            if exc.rollback.left:
                self._watch_unplug(key, exc.rollback.left, time.monotonic(),
                                   emit_detached=False)
            raise
        finally:
            self._attaching.discard(key)
        self._emit("SLOT_ATTACHED", {"vm": self.name, "bus": plan.bus, "slot": plan.slot,
                                     "ids": plan.ids})
        return {**plan.describe(self.name), "steps": [s.as_json() for s in plan.steps]}

    # -- incremental attach ------------------------------------------------------------------
    async def function_add(self, spec: FunctionSpec, bus: str, slot: int) -> dict[str, Any]:
        key = (bus, slot)
        async with self._alloc:
            topo = await self.topology()
            b = topo.bus(bus)
            if b is None:
                raise NotFound(f"bus: no PCI bus '{bus}' in this VM")
            if not b.hotpluggable:
                raise Unsupported(f"bus: '{bus}' does not support hotplugging")
            if not 0 <= slot < b.slot_count:
                raise InvalidRequest(f"slot: bus '{bus}' has slots 0-{b.slot_count - 1}")
            if not b.slot(slot).empty or key in self._attaching or key in self._unplugging:
                raise Conflict(f"slot: {bus} slot {slot} is taken")
            if spec.id in topo.device_ids() or (
                    spec.id in self.pending.ids() and key not in self.pending):
                raise Conflict(f"id: a device with id '{spec.id}' already exists in this VM")
            if spec.function != 0:
                policy = self.policies(topo)[bus]
                if not policy.multifunction:
                    raise Unsupported(policy.unsupported_reason)
                entry = self.pending.queue(spec, bus, slot, self._pending_ttl)
                self._emit("FUNCTION_QUEUED", {"vm": self.name, "bus": bus, "slot": slot,
                                               "function": spec.function, "id": spec.id})
                return {"queued": True, **entry.describe(self.name)}
            queued = self.pending.get(key)
            if queued is not None and any(f.id == spec.id for f in queued.functions.values()):
                raise Conflict(f"id: '{spec.id}' is already queued for {bus} slot {slot}")
            # The queue becomes one attach: it leaves the queue and the slot stays reserved
            # (now as attaching) so nobody else can take it in between.
            self.pending.pop(key)
            self._attaching.add(key)
        functions = [*(queued.functions.values() if queued else []), spec]
        try:
            result = await self.attach(functions, bus=bus, slot=slot, own=key)
        finally:
            self._attaching.discard(key)
        return {"queued": False, **result}

    def pending_cancel(self, bus: str, slot: int) -> dict[str, Any]:
        entry = self.pending.pop((bus, slot))
        if entry is None:
            raise NotFound(f"bus/slot: nothing is queued for {bus} slot {slot}")
        return entry.describe(self.name)

    async def _expire_queues(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for entry in self.pending.expired(time.monotonic()):
                self.pending.pop((entry.bus, entry.slot))
                self._emit("PENDING_EXPIRED", self._queue_event(entry))

    def _queue_event(self, entry: PendingSlot) -> dict[str, Any]:
        return {"vm": self.name, "bus": entry.bus, "slot": entry.slot,
                "ids": [f.id for f in entry.functions.values()]}

    # -- detach ----------------------------------------------------------------------------
    async def detach(self, *, ids: Sequence[str] | None, bus: str | None, slot: int | None,
                     whole_slot: bool, timeout: float | None) -> dict[str, Any]:
        async with self._alloc:
            topo = await self.topology()
            key, members = self._resolve_slot(topo, ids, bus, slot, whole_slot)
            if key in self._unplugging:
                raise Conflict(f"slot: {key[0]} slot {key[1]} is already unplugging "
                               f"({', '.join(self._unplugging[key])}); wait for it")
            if key in self._attaching:
                raise Conflict(f"slot: {key[0]} slot {key[1]} is being attached")
            policy = self.policies(topo)[key[0]]
            all_ids = [m.id for m in members]
            started = time.monotonic()
            done = await execute_unplug(policy.unplug_targets(members), all_ids, self.conn,
                                        self.tracker, policy.timeouts.unplug)
            self._unplugging[key] = all_ids
        self._watch_unplug(key, all_ids, started, done=done)
        limit = timeout if timeout is not None else policy.timeouts.unplug
        try:
            await asyncio.wait_for(asyncio.shield(done), limit)
        except TimeoutError:
            raise Timeout(f"guest did not release {key[0]} slot {key[1]} within {limit:g} s; "
                          "the slot stays 'unplugging' and completes when QEMU reports "
                          "DEVICE_DELETED") from None
        return {"vm": self.name, "bus": key[0], "slot": key[1], "ids": all_ids,
                "seconds": round(time.monotonic() - started, 3)}

    def _resolve_slot(self, topo: Topology, ids: Sequence[str] | None, bus: str | None,
                      slot: int | None, whole_slot: bool) -> tuple[SlotKey, list[SlotMember]]:
        if ids:
            keys = set()
            for i, dev_id in enumerate(ids):
                found = topo.find_device(dev_id)
                if found is None:
                    hint = " (it is queued: use pending-cancel)" \
                        if dev_id in self.pending.ids() else ""
                    raise NotFound(f"ids[{i}]: no device '{dev_id}' in this VM{hint}")
                keys.add((found[0].name, found[1].slot))
            if len(keys) > 1:
                raise InvalidRequest("ids: the devices are in different slots; detach one slot "
                                     "per request")
            (key,) = keys
        elif bus is not None and slot is not None:
            key = (bus, slot)
        else:
            raise InvalidRequest("ids: give the ids to detach, or bus and slot")
        b = topo.bus(key[0])
        if b is None:
            raise NotFound(f"bus: no PCI bus '{key[0]}' in this VM")
        if not b.hotpluggable:
            raise Unsupported(f"bus: '{key[0]}' does not support hot-unplug")
        functions = b.slot(key[1]).functions
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

    def _watch_unplug(self, key: SlotKey, ids: list[str], started: float,
                      done: asyncio.Future[None] | None = None,
                      emit_detached: bool = True) -> None:
        """Keep the slot 'unplugging' until every id is deleted, whoever is still waiting."""
        fut = done if done is not None else self.tracker.expect(ids)
        self._unplugging[key] = ids

        def finished(f: asyncio.Future[None]) -> None:
            if self._unplugging.get(key) is ids:
                del self._unplugging[key]
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.warning("unplug failed", extra={"vm": self.name, "error": str(exc)})
                return
            if emit_detached:
                self._emit("SLOT_DETACHED", {
                    "vm": self.name, "bus": key[0], "slot": key[1], "ids": ids,
                    "seconds": round(time.monotonic() - started, 3)})

        fut.add_done_callback(finished)


__all__ = ["ManagedVm", "QemuError"]
