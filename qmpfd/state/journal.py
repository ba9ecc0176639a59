"""The journal: managed VMs and operations in flight, saved before QEMU is touched.

An operation is written *before* its first QMP command and removed after its last event, so after a
crash (SIGKILL at any point) the journal names every slot that may be half-done. It records intent
(the ids and their function numbers), not progress: reconciliation asks QEMU which of those ids
exist, which is the truth even when the crash fell between a command and a journal write.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qmpfd.state.store import StateStore

FORMAT = 1


@dataclass
class Operation:
    kind: str                       # "attach" or "detach"
    vm: str
    bus: str
    slot: int
    functions: dict[str, int]       # id -> guest function number
    policy: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    #: detach: the device_del commands have been sent (do not press a PCIe button twice).
    sent: bool = False

    def describe(self) -> dict[str, Any]:
        return {"operation": self.id, "kind": self.kind, "vm": self.vm, "bus": self.bus,
                "slot": self.slot, "ids": sorted(self.functions, key=self.functions.__getitem__),
                "policy": self.policy, "started": self.started, "sent": self.sent,
                "age": round(time.time() - self.started, 1)}


class Journal:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._changes = 0      # changes made in memory so far (group commit, see _flush)
        self._saved = 0        # of those, how many are on disk
        self._flush_lock = asyncio.Lock()
        self.vms: dict[str, str] = {}
        self.ops: dict[str, Operation] = {}
        #: host functions held for VMs: address -> {vm, original, ids}
        self.host: dict[str, dict[str, Any]] = {}
        #: queued functions (function-add): vm -> "bus/slot" -> PendingSlot record
        self.pending: dict[str, dict[str, dict[str, Any]]] = {}

    @classmethod
    def open(cls, directory: Path) -> Journal:
        j = cls(StateStore(directory))
        doc = j._store.load()
        j.vms = {str(k): str(v) for k, v in doc.get("vms", {}).items()}
        j.host = {str(k): dict(v) for k, v in doc.get("host", {}).items()}
        j.pending = {str(vm): {str(k): dict(r) for k, r in queues.items()}
                     for vm, queues in doc.get("pending", {}).items() if isinstance(queues, dict)}
        for raw in doc.get("operations", []):
            try:
                op = Operation(**raw)
            except TypeError:
                continue  # a record from an incompatible version: nothing we can act on
            j.ops[op.id] = op
        return j

    def _doc(self) -> dict[str, Any]:
        return {"format": FORMAT, "vms": self.vms, "host": self.host, "pending": self.pending,
                "operations": [asdict(op) for op in self.ops.values()]}

    async def _flush(self) -> None:
        """Put the in-memory journal on disk; return once a write holding this caller's change
        has been fsynced. Concurrent callers share writes (group commit): whoever waits for
        the lock while another write runs usually finds its change written by the next one,
        so N operations starting together cost about two fsync rounds, not N."""
        self._changes += 1
        mine = self._changes
        async with self._flush_lock:
            if self._saved >= mine:
                return
            covered = self._changes  # every change so far is in memory, so in this write
            await self._store.save(self._doc())
            self._saved = covered

    async def vm_added(self, name: str, qmp: str) -> None:
        self.vms[name] = qmp
        await self._flush()

    async def vm_removed(self, name: str) -> None:
        self.vms.pop(name, None)
        self.pending.pop(name, None)
        for op_id in [i for i, op in self.ops.items() if op.vm == name]:
            del self.ops[op_id]
        await self._flush()

    async def begin(self, op: Operation) -> Operation:
        self.ops[op.id] = op
        await self._flush()
        return op

    async def mark_sent(self, op: Operation) -> None:
        op.sent = True
        await self._flush()

    async def end(self, op: Operation) -> None:
        if self.ops.pop(op.id, None) is not None:
            await self._flush()

    async def hold(self, address: str, vm: str, original: str | None, ids: list[str]) -> None:
        self.host[address] = {"vm": vm, "original": original, "ids": ids}
        await self._flush()

    async def unhold(self, address: str) -> None:
        if self.host.pop(address, None) is not None:
            await self._flush()

    async def queue_saved(self, vm: str, record: dict[str, Any]) -> None:
        self.pending.setdefault(vm, {})[f"{record['bus']}/{record['slot']}"] = record
        await self._flush()

    async def queue_dropped(self, vm: str, bus: str, slot: int) -> None:
        queues = self.pending.get(vm, {})
        if queues.pop(f"{bus}/{slot}", None) is not None:
            if not queues:
                del self.pending[vm]
            await self._flush()

    def for_vm(self, name: str) -> list[Operation]:
        return [op for op in self.ops.values() if op.vm == name]
