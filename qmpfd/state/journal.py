"""The journal: managed VMs, operations in flight, host functions held, queued functions.

It records intent, not progress, and reconciliation asks QEMU which of an operation's ids exist,
which is the truth even when a crash fell between a command and a journal write.

When a record must be durable (synced) before QEMU is touched. The rule: **only where a crash
right after that QEMU step could leave a state that recovery cannot read back from QEMU
itself.** Per operation:

- *Attach of one function*: one ``device_add``; QEMU holds the whole slot or nothing, and the
  topology read at restart says which. No synced record: its begin record is written behind the
  request (a crash before it lands leaves either an empty slot or a whole one, both true and
  both what qmpfd reads back). The reply claims only what QEMU holds.
- *Attach of 2+ functions*: a crash between its ``device_add`` commands leaves functions without
  function 0, which QEMU hides from the guest and nobody would take back: the begin record is
  synced before the first ``device_add`` (recovery rolls them back).
- *Detach, ACPI (acpi-pcihp)*: a crash after ``device_del`` leaves the slot present in QEMU
  with the guest's eject pending. Read back after a restart it is a present slot; the eject,
  when it comes, is a deletion qmpfd follows like any other, and a detach sent again is a second
  ``device_del``, which ACPI accepts or refuses but never turns into a cancel. No synced record.
- *Detach, native PCIe and pseries*: a second ``device_del`` within the guest's 5 s window
  presses the attention button again and cancels the first (pseries: a second unplug request on
  a DRC already releasing). A restarted qmpfd must know the unplug was sent rather than send it
  again: the begin record is synced before ``device_del`` and the "sent" record after it.
- *A rollback's device_del* (an attach undone) is always recorded as sent with a sync: the
  failed attach's reply claims the slot will be emptied.

Every end record is written unsynced: recovery that finds all ids present (or absent) ends the
operation the same way.

Memory follows the disk: a durable change is made in memory only once its record is written
(see :mod:`qmpfd.state.log`). Records that only confirm what already happened (an operation
ended, a function given back) change memory at once and are written without failing anyone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpfd.state import records as r
from qmpfd.state.log import AppendLog, JournalDamaged
from qmpfd.state.logfile import fsync_dir

log = logging.getLogger("qmpfd.state")

#: Operation ids: 48 random bits each, from a generator seeded by the OS once (an id names an
#: operation; it guards nothing), not a getrandom call per operation on the request's path
_ids = random.Random(os.urandom(16))

LOG_NAME = "journal.log"
LEGACY_NAME = "state.json"   # format 1: one JSON document (migrated on first start)


@dataclass
class Operation:
    kind: str                       # "attach" or "detach"
    vm: str
    bus: str
    slot: int
    functions: dict[str, int]       # id -> guest function number
    policy: str
    id: str = field(default_factory=lambda: f"{_ids.getrandbits(48):012x}")  # 12 hex digits
    started: float = field(default_factory=time.time)
    #: the device_del commands have been sent (do not press a PCIe button twice).
    sent: bool = False
    #: why qmpfd is waiting before it can send (the guest is busy with the slot); shown by
    #: query-operations, never journaled
    waiting: str | None = None
    #: whether a crash after its QEMU step needs this record to be recovered (the module
    #: docstring); not journaled: an operation read back from the file was durable
    durable: bool = True

    @property
    def ids(self) -> list[str]:
        return sorted(self.functions, key=self.functions.__getitem__)

    def record(self, sent: bool | None = None) -> r.OpRecord:
        """As journaled; ``sent``: as it was when the record was made (default: now)."""
        return r.OpRecord(kind=self.kind, vm=self.vm, bus=self.bus,
                          slot=self.slot, functions=dict(self.functions), policy=self.policy,
                          id=self.id, started=self.started,
                          sent=self.sent if sent is None else sent)


def _op(rec: r.OpRecord) -> Operation:
    return Operation(**rec.model_dump())


class Journal:
    def __init__(self, log_file: AppendLog) -> None:
        self._log = log_file
        self._log.snapshot = lambda: r.encode(self._snapshot())
        self.vms: dict[str, str] = {}
        self.ops: dict[str, Operation] = {}
        #: host functions held for VMs: address -> {vm, original, ids}
        self.host: dict[str, dict[str, Any]] = {}
        #: queued functions (function-add): vm -> "bus/slot" -> PendingSlot record
        self.pending: dict[str, dict[str, dict[str, Any]]] = {}

    @property
    def path(self) -> Path:
        return self._log.path

    @property
    def syncs(self) -> int:
        return self._log.syncs

    @property
    def last_error(self) -> str | None:
        return self._log.last_error

    def problem(self) -> str | None:
        """Whether the journal on disk is still the one this daemon writes (query-health)."""
        return self._log.identity_problem()

    @classmethod
    def open(cls, directory: Path) -> Journal:
        """Load the journal (migrating a format-1 state.json). Raises JournalDamaged."""
        path = directory / LOG_NAME
        legacy = directory / LEGACY_NAME
        if not path.exists() and legacy.exists():
            _migrate(legacy, path)
        log_file = AppendLog(path)
        j = cls(log_file)
        origin: dict[str, int] = {}      # operation id or "queue VM" -> the line that made it
        for line, rec in enumerate(log_file.open(), 1):
            j._apply(rec)
            if isinstance(rec, r.OpBegun):
                origin[rec.op.id] = line
            elif isinstance(rec, r.QueueSaved):
                origin[f"queue {rec.vm}"] = line
            elif isinstance(rec, r.Snapshot):
                origin.update({o.id: line for o in rec.ops})
                origin.update({f"queue {vm}": line for vm in rec.pending})
        j._check_references(origin)
        return j

    def _check_references(self, origin: dict[str, int]) -> None:
        """Every record can be valid and the whole still wrong: an operation or a queue of a
        VM the journal does not list would be a ghost forever. Refused like damage, naming
        the line that made it."""
        for op in self.ops.values():
            if op.vm not in self.vms:
                raise JournalDamaged(self.path, origin.get(op.id, 0),
                                     f"operation {op.id} is on VM '{op.vm}', which the journal "
                                     "does not list")
        for vm in self.pending:
            if vm not in self.vms:
                raise JournalDamaged(self.path, origin.get(f"queue {vm}", 0),
                                     f"functions are queued for VM '{vm}', which the journal "
                                     "does not list")

    def close(self) -> None:
        self._log.close()

    async def drain(self) -> None:
        await self._log.drain()

    # -- applying records (load and live use share this one function) ----------------------
    def _apply(self, rec: r.Record) -> None:
        match rec:
            case r.Snapshot():
                self.vms = dict(rec.vms)
                self.ops = {o.id: _op(o) for o in rec.ops}
                self.host = {a: h.model_dump() for a, h in rec.host.items()}
                self.pending = {vm: {k: dict(q) for k, q in qs.items()}
                                for vm, qs in rec.pending.items()}
            case r.VmAdded():
                self.vms[rec.name] = rec.qmp
            case r.VmRemoved():
                self.vms.pop(rec.name, None)
                self.pending.pop(rec.name, None)
                for op_id in [i for i, op in self.ops.items() if op.vm == rec.name]:
                    del self.ops[op_id]
            case r.OpBegun():
                self.ops[rec.op.id] = _op(rec.op)
            case r.OpSent():
                if rec.id in self.ops:
                    self.ops[rec.id].sent = True
            case r.OpEnded():
                self.ops.pop(rec.id, None)
            case r.HostHeld():
                self.host[rec.address] = rec.holding.model_dump()
            case r.HostReleased():
                self.host.pop(rec.address, None)
            case r.QueueSaved():
                q = rec.queue
                self.pending.setdefault(rec.vm, {})[f"{q.get('bus')}/{q.get('slot')}"] = dict(q)
            case r.QueueDropped():
                queues = self.pending.get(rec.vm, {})
                queues.pop(f"{rec.bus}/{rec.slot}", None)
                if not queues:
                    self.pending.pop(rec.vm, None)

    def _snapshot(self) -> r.Snapshot:
        return r.Snapshot(
            t="snapshot", format=r.FORMAT, vms=dict(self.vms),
            ops=[op.record() for op in self.ops.values()],
            host={a: r.HostRecord.model_validate(h) for a, h in self.host.items()},
            pending={vm: {k: dict(q) for k, q in qs.items()} for vm, qs in self.pending.items()})

    async def _commit(self, rec: r.Record) -> None:
        await self._log.commit(r.encode(rec), lambda: self._apply(rec))

    def _settle(self, rec: r.Record, *, sync: bool = False) -> None:
        self._apply(rec)
        self._log.settle(lambda: r.encode(rec), sync=sync)   # encoded when written

    # -- VMs -----------------------------------------------------------------------------
    async def vm_added(self, name: str, qmp: str) -> None:
        if self.vms.get(name) != qmp:
            await self._commit(r.VmAdded(t="vm+", name=name, qmp=qmp))

    async def vm_removed(self, name: str) -> None:
        await self._commit(r.VmRemoved(t="vm-", name=name))

    # -- operations ----------------------------------------------------------------------
    async def begin(self, op: Operation) -> Operation:
        """Record an operation before QEMU is touched. A durable one (``op.durable``) returns
        once its record is on disk; another is written behind the request, which waits for no
        disk (the module docstring says which is which). Either way a journal that can no
        longer be written refuses it: StateWriteError, nothing changed."""
        if op.durable:
            rec = r.OpBegun(t="op+", op=op.record())
            await self._log.commit(r.encode(rec), lambda: self.ops.__setitem__(op.id, op))
            return op
        self._log.check_writable()
        self.ops[op.id] = op
        # Encoded when its batch is written (while QEMU works, not before it is asked):
        # ``sent`` is the one journaled field that changes, so it is taken now.
        sent = op.sent
        self._log.settle(lambda: r.encode(r.OpBegun(t="op+", op=op.record(sent))))
        return op

    def mark_sent(self, op: Operation) -> None:
        """device_del was accepted: QEMU has done it, so this never fails the request. Synced
        where a second device_del would cancel the first (``op.durable``) and for a rollback."""
        op.sent = True
        self._settle(r.OpSent(t="op~", id=op.id), sync=op.durable or op.kind == "attach")

    def end(self, op: Operation) -> None:
        if op.id in self.ops:
            self._settle(r.OpEnded(t="op-", id=op.id))

    def for_vm(self, name: str) -> list[Operation]:
        return [op for op in self.ops.values() if op.vm == name]

    # -- host functions ------------------------------------------------------------------
    async def hold(self, address: str, vm: str, original: str | None, ids: list[str]) -> None:
        await self._commit(r.HostHeld(t="host+", address=address, holding=r.HostRecord(
            vm=vm, original=original, ids=list(ids))))

    def unhold(self, address: str) -> None:
        if address in self.host:
            self._settle(r.HostReleased(t="host-", address=address))

    # -- queued functions ----------------------------------------------------------------
    async def queue_saved(self, vm: str, record: dict[str, Any]) -> None:
        await self._commit(r.QueueSaved(t="queue+", vm=vm, queue=record))

    async def queue_cancelled(self, vm: str, bus: str, slot: int) -> None:
        """A client dropped the queue: durable, so a failure leaves the queue as it was."""
        await self._commit(r.QueueDropped(t="queue-", vm=vm, bus=bus, slot=slot))

    def queue_consumed(self, vm: str, bus: str, slot: int) -> None:
        """The queue was flushed into QEMU or expired: only confirms what happened."""
        if f"{bus}/{slot}" in self.pending.get(vm, {}):
            self._settle(r.QueueDropped(t="queue-", vm=vm, bus=bus, slot=slot))


def _migrate(legacy: Path, path: Path) -> None:
    """state.json (format 1) -> journal.log holding one snapshot; state.json kept aside."""
    try:
        doc = json.loads(legacy.read_bytes())
        snap = r.Snapshot(
            t="snapshot", format=r.FORMAT, vms=doc.get("vms", {}),
            ops=[r.OpRecord.model_validate(o) for o in doc.get("operations", [])],
            host={a: r.HostRecord.model_validate(h) for a, h in doc.get("host", {}).items()},
            pending=doc.get("pending", {}))
    except (ValueError, AttributeError, TypeError) as exc:
        raise JournalDamaged(legacy, 1, f"cannot migrate: {str(exc).splitlines()[0]}") from None
    tmp = path.with_suffix(".migrate")
    tmp.write_bytes(r.encode(snap))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    os.replace(legacy, legacy.with_suffix(".json.migrated"))
    fsync_dir(path.parent)
    log.info("state.json migrated to journal.log", extra={"path": str(path)})
