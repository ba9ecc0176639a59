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
from collections.abc import Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

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
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.executor import AttachFailed, execute_attach, execute_unplug
from qmpfd.hotplug.pending import PendingQueues, PendingSlot, SlotKey
from qmpfd.hotplug.plan import FunctionSpec, plan_attach
from qmpfd.hotplug.policies import POLICIES, Policy, policy_for, vm_policy_name
from qmpfd.hotplug.policies.base import SlotMember
from qmpfd.hotplug.recovery import Action, decide
from qmpfd.state.journal import Journal, Operation
from qmpfd.vm.connection import VmConnection
from qmpfd.vm.introspect import VmIdentity, find_root_buses, read_identity, read_topology
from qmpfd.vm.topology import Topology

log = logging.getLogger("qmpfd.vm")

Emit = Callable[[str, dict[str, Any]], None]
#: Called with (vm, ids) once QEMU has deleted functions: host functions held for them go back.
OnRemoved = Callable[[str, list[str]], Coroutine[Any, Any, Any]]
#: Called with (vm, ids QEMU holds) after every (re)connection.
OnConnected = Callable[[str, AbstractSet[str]], Coroutine[Any, Any, Any]]

RECONNECT_FIRST = 0.5   # seconds before the first reconnect attempt, doubled up to
RECONNECT_MAX = 10.0    # this bound, so a restarted QEMU is found within seconds
QEMU_PROBE_TIMEOUT = 2.0  # seconds a liveness probe of the QMP socket may take
FORCE_GRACE = 1.0       # a forced detach still waits this long for an immediate completion


class ManagedVm:
    def __init__(self, name: str, qmp: Path, emit: Emit, journal: Journal, *,
                 command_timeout: float, connect_timeout: float, pending_ttl: float,
                 policies: dict[str, Policy] | None = None,
                 on_removed: OnRemoved | None = None,
                 on_connected: OnConnected | None = None) -> None:
        self.name = name
        self._on_removed = on_removed
        self._on_connected = on_connected
        self.qmp = qmp
        self._emit = emit
        self.journal = journal
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pending_ttl = pending_ttl
        self._policy_table = policies
        self.tracker = DeletionTracker()
        self.conn = self._new_connection()
        self.identity: VmIdentity | None = None
        self._policy_cache: str | None = None   # the headline policy, as last read
        self._roots: list[tuple[str, str, str, str]] | None = None
        self._alloc = asyncio.Lock()
        self._attaching: set[SlotKey] = set()
        self._unplugging: dict[SlotKey, list[str]] = {}
        self.pending = PendingQueues.restore(list(journal.pending.get(name, {}).values()),
                                             time.monotonic(), time.time())
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._reconnecting = False

    # -- lifecycle -------------------------------------------------------------------------
    def _new_connection(self) -> VmConnection:
        conn = VmConnection(self.name, self.qmp, self._command_timeout)
        conn.subscribe(self.tracker.handle_event)
        conn.on_disconnect = self._on_disconnect
        return conn

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"{name}-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, *, keep_trying: bool = False) -> dict[str, Any]:
        """Connect and learn the VM. With ``keep_trying`` (re-adoption after a restart), a VM
        that cannot be reached yet stays managed, disconnected, and is retried in the background.
        """
        self._spawn(self._expire_queues(), "expiry")
        try:
            await self._connect_and_learn()
        except QmpfdError:
            if not keep_trying:
                await self.stop()
                raise
            self._on_disconnect()
        return self.info()

    def info(self) -> dict[str, Any]:
        ident = self.identity
        return {"name": self.name, "arch": ident.arch if ident else None,
                "machine": ident.machine if ident else None,
                "qemu": ident.qemu if ident else None, "policy": self._policy_cache,
                "connected": self.conn.connected}

    async def _connect_and_learn(self) -> None:
        await self.conn.connect(self._connect_timeout)
        try:
            self.identity = await read_identity(self.conn)
            self._roots = await find_root_buses(self.conn)
            topo = await self.topology()
            self._policy_cache = self.policy_name(topo)
            await self.reconcile()
            topo = await self.topology()  # reconciliation may have rolled functions back
            await self._prune_queues(topo)
            if self._on_connected is not None:
                await self._on_connected(self.name, topo.device_ids())
        except BaseException:
            await self.conn.close()
            raise

    def _on_disconnect(self) -> None:
        if self._stopping or self._reconnecting:
            return
        self._reconnecting = True
        self._emit("VM_DISCONNECTED", {"vm": self.name, "qmp": str(self.qmp)})
        self._spawn(self._reconnect(), "reconnect")

    async def _reconnect(self) -> None:
        """Bounded exponential backoff until QEMU's QMP socket answers again."""
        delay = RECONNECT_FIRST
        try:
            while not self._stopping:
                await asyncio.sleep(delay)
                self.conn = self._new_connection()
                try:
                    await self._connect_and_learn()
                except QmpfdError as exc:
                    log.debug("reconnect failed", extra={"vm": self.name, "error": exc.desc})
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                log.info("QMP connection restored", extra={"vm": self.name})
                self._emit("VM_RECONNECTED", {"vm": self.name, "qmp": str(self.qmp)})
                return
        finally:
            self._reconnecting = False

    async def qemu_gone(self) -> bool:
        """True only when nothing listens on the VM's QMP socket any more: the socket file is
        gone or refuses connections, which a living QEMU never does. Used to decide whether
        host functions held for the VM may be given back; any doubt (a slow or busy QEMU)
        answers False, because giving a device back under a running QEMU is the worse error."""
        if self.conn.connected:
            return False
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.qmp)),
                                               QEMU_PROBE_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return False

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.conn.close()

    # -- recovery --------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Finish or undo what the journal says was in flight, against what QEMU holds now."""
        ops = self.journal.for_vm(self.name)
        if not ops:
            return
        topo = await self.topology()
        present = topo.device_ids()
        policies = self.policies(topo)
        for op in ops:
            decision = decide(op, present)
            key = (op.bus, op.slot)
            log.info("reconciling", extra={"vm": self.name, "operation": op.id,
                                           "kind": op.kind, "action": decision.action.value})
            members = [SlotMember(i, op.functions[i]) for i in decision.ids]
            policy = policies.get(op.bus) or POLICIES.get(op.policy)
            if decision.action is Action.COMPLETED:
                await self.journal.end(op)
                self._emit("SLOT_ATTACHED", {"vm": self.name, "bus": op.bus, "slot": op.slot,
                                             "ids": list(op.functions), "recovered": True})
            elif decision.action is Action.FORGET:
                await self.journal.end(op)
                await self._removed(list(op.functions))
                self._emit("SLOT_ATTACH_FAILED", {
                    "vm": self.name, "bus": op.bus, "slot": op.slot, "ids": list(op.functions),
                    "reason": "interrupted before any function reached QEMU"})
            elif decision.action is Action.DETACHED:
                await self.journal.end(op)
                await self._removed(list(op.functions))
                self._emit("SLOT_DETACHED", {"vm": self.name, "bus": op.bus, "slot": op.slot,
                                             "ids": list(op.functions), "recovered": True})
            elif decision.action in (Action.ROLL_BACK, Action.SEND_UNPLUG) and policy:
                targets = (policy.rollback_targets(members) if op.kind == "attach"
                           else policy.unplug_targets(members))
                done = self.tracker.expect(decision.ids)  # before device_del: events are fast
                for target in targets:
                    with contextlib.suppress(QemuError):
                        await self.conn.execute("device_del", {"id": target})
                await self.journal.mark_sent(op)
                self._watch_op(op, key, list(decision.ids), done)
            else:  # KEEP_WAITING (or no policy known for the bus any more)
                self._watch_op(op, key, list(decision.ids))

    async def _removed(self, ids: list[str]) -> None:
        if self._on_removed is not None:
            await self._on_removed(self.name, ids)

    def _watch_op(self, op: Operation, key: SlotKey, ids: list[str],
                  done: asyncio.Future[None] | None = None) -> None:
        """Keep the slot 'unplugging' until ids are gone; then close the journal entry."""
        started = time.monotonic()
        done = done if done is not None else self.tracker.expect(ids)
        attach = op.kind == "attach"
        self._watch_unplug(key, ids, started, done=done, emit_detached=not attach,
                           op=op)
        if attach:
            def failed(f: asyncio.Future[None]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._emit("SLOT_ATTACH_FAILED", {
                        "vm": self.name, "bus": op.bus, "slot": op.slot,
                        "ids": list(op.functions), "reason": "interrupted; rolled back"})
            done.add_done_callback(failed)

    # -- facts -----------------------------------------------------------------------------
    async def topology(self) -> Topology:
        return await read_topology(self.conn, self._roots)

    def _ident(self) -> VmIdentity:
        assert self.identity is not None, "start() sets the identity"
        return self.identity

    def policies(self, topo: Topology) -> dict[str, Policy]:
        ident = self._ident()
        return {b.name: policy_for(ident.arch, ident.machine, b.mechanism, self._policy_table,
                                   ident.qemu_version)
                for b in topo.buses}

    def policy_name(self, topo: Topology) -> str:
        ident = self._ident()
        return vm_policy_name(ident.arch, ident.machine, topo.mechanisms())

    def describe(self, topo: Topology | None = None) -> dict[str, Any]:
        if topo is not None and self.identity is not None:
            self._policy_cache = self.policy_name(topo)
        return {**self.info(), "qmp": str(self.qmp)}

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
        op = Operation("attach", self.name, plan.bus, plan.slot,
                       {f.id: f.function for f in plan.functions}, plan.policy.name)
        try:
            log.info("attach", extra={"vm": self.name, "bus": plan.bus, "slot": plan.slot,
                                      "ids": plan.ids})
            await self.journal.begin(op)  # before QEMU is touched: a crash leaves a record
            await fault_point("attach-begin")
            await execute_attach(plan, self.conn, self.tracker,
                                 after_step=lambda n: fault_point(f"attach-step-{n}"))
        except AttachFailed as exc:
            self._emit("SLOT_ATTACH_FAILED", {"vm": self.name, "bus": plan.bus,
                                              "slot": plan.slot, "ids": plan.ids,
                                              "reason": exc.desc})
            if isinstance(exc.cause, VmGone):
                pass  # the journal keeps the operation; reconcile() settles it on reconnect
            elif exc.rollback.left:
                await self.journal.mark_sent(op)
                self._watch_unplug(key, exc.rollback.left, time.monotonic(),
                                   emit_detached=False, op=op)
            else:
                await self.journal.end(op)
            raise
        except BaseException:
            await self.journal.end(op)
            raise
        finally:
            self._attaching.discard(key)
        await self.journal.end(op)
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
                await self._save_queue(entry)
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
            # Only now does the queue leave the journal: a crash during the flush leaves it
            # there, and the restarted qmpfd offers it again (see _prune_queues).
            if queued is not None:
                await self.journal.queue_dropped(self.name, bus, slot)
        return {"queued": False, **result}

    async def _save_queue(self, entry: PendingSlot) -> None:
        await self.journal.queue_saved(self.name, entry.to_record(time.monotonic(), time.time()))

    async def _drop_queue(self, entry: PendingSlot) -> None:
        self.pending.pop((entry.bus, entry.slot))
        await self.journal.queue_dropped(self.name, entry.bus, entry.slot)

    async def pending_cancel(self, bus: str, slot: int) -> dict[str, Any]:
        entry = self.pending.get((bus, slot))
        if entry is None:
            raise NotFound(f"bus/slot: nothing is queued for {bus} slot {slot}")
        await self._drop_queue(entry)
        return entry.describe(self.name)

    async def _prune_queues(self, topo: Topology) -> None:
        """After (re)connecting: drop restored queues that QEMU has overtaken (their slot is
        occupied, or one of their ids exists), which a crash in the middle of a flush or a
        change made behind qmpfd's back can leave."""
        present = topo.device_ids()
        for entry in self.pending.all():
            b = topo.bus(entry.bus)
            ids = {f.id for f in entry.functions.values()}
            if b is None or not b.slot(entry.slot).empty or ids & present:
                log.warning("queued functions dropped: QEMU has their slot or ids",
                            extra={"vm": self.name, "bus": entry.bus, "slot": entry.slot,
                                   "ids": sorted(ids)})
                await self._expire(entry)

    async def _expire_queues(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for entry in self.pending.expired(time.monotonic()):
                await self._expire(entry)

    async def _expire(self, entry: PendingSlot) -> None:
        await self._drop_queue(entry)
        self._emit("PENDING_EXPIRED", self._queue_event(entry))

    def _queue_event(self, entry: PendingSlot) -> dict[str, Any]:
        return {"vm": self.name, "bus": entry.bus, "slot": entry.slot,
                "ids": [f.id for f in entry.functions.values()]}

    # -- detach ----------------------------------------------------------------------------
    async def detach(self, *, ids: Sequence[str] | None, bus: str | None, slot: int | None,
                     whole_slot: bool, timeout: float | None,
                     force: bool = False) -> dict[str, Any]:
        """Unplug a whole slot and wait for every DEVICE_DELETED.

        ``force``: for a guest that cannot answer (paused, no OS): send the unplug request and
        return at once with the slot 'unplugging' instead of waiting; QEMU completes it as soon
        as it can (at once where no guest is needed, otherwise when the guest runs).
        """
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
            op = await self.journal.begin(Operation(
                "detach", self.name, key[0], key[1], {m.id: m.function for m in members},
                policy.name))
            await fault_point("detach-begin")
            try:
                done = await execute_unplug(policy.unplug_targets(members), all_ids, self.conn,
                                            self.tracker)
            except QmpfdError:
                await self.journal.end(op)
                raise
            await self.journal.mark_sent(op)
            await fault_point("detach-sent")
            self._unplugging[key] = all_ids
        self._watch_unplug(key, all_ids, started, done=done, op=op)
        limit = timeout if timeout is not None else policy.timeouts.unplug
        if force:
            limit = min(limit, FORCE_GRACE)
        try:
            await asyncio.wait_for(asyncio.shield(done), limit)
        except TimeoutError:
            if force:
                return {"vm": self.name, "bus": key[0], "slot": key[1], "ids": all_ids,
                        "seconds": round(time.monotonic() - started, 3), "unplugging": True}
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
                      emit_detached: bool = True, op: Operation | None = None) -> None:
        """Keep the slot 'unplugging' until every id is deleted, whoever is still waiting;
        then close the journal entry ``op``."""
        fut = done if done is not None else self.tracker.expect(ids)
        self._unplugging[key] = ids

        def finished(f: asyncio.Future[None]) -> None:
            if self._unplugging.get(key) is ids:
                del self._unplugging[key]
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                # Lost connection: the journal keeps op and reconcile() resumes the wait.
                # Guest refusal: the functions stay; the operation is over.
                log.warning("unplug failed", extra={"vm": self.name, "error": str(exc)})
                if op is not None and not isinstance(exc, VmGone):
                    self._spawn(self.journal.end(op), "journal")
                return
            if op is not None:
                self._spawn(self.journal.end(op), "journal")
            self._spawn(self._removed(ids), "release")
            if emit_detached:
                self._emit("SLOT_DETACHED", {
                    "vm": self.name, "bus": key[0], "slot": key[1], "ids": ids,
                    "seconds": round(time.monotonic() - started, 3)})

        fut.add_done_callback(finished)

