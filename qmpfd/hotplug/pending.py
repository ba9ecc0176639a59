"""Per-slot queues for incremental attach (``function-add``).

A non-zero function waits here, not in QEMU, until function 0 of its slot arrives; the queue is
then flushed as one attach. Keeping queued functions out of QEMU means a queue that is cancelled
or expires needs no guest cooperation to clean up.

Queues are also kept in the journal (:meth:`PendingSlot.to_record`), so a restarted qmpfd still
flushes them when function 0 arrives: a management plane that queued function 1 before an
upgrade must not see function 0 attached alone afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qmpfd.errors import Conflict
from qmpfd.hotplug.plan import FunctionSpec

SlotKey = tuple[str, int]


@dataclass
class PendingSlot:
    bus: str
    slot: int
    expires_at: float
    functions: dict[int, FunctionSpec] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def add(self, spec: FunctionSpec) -> None:
        if spec.function in self.functions:
            other = self.functions[spec.function].id
            raise Conflict(f"function: {self.bus} slot {self.slot} function {spec.function} is "
                           f"already queued (id '{other}')")
        if any(f.id == spec.id for f in self.functions.values()):
            raise Conflict(f"id: '{spec.id}' is already queued for {self.bus} slot {self.slot}")
        self.functions[spec.function] = spec

    def to_record(self, now_mono: float, now_wall: float) -> dict[str, Any]:
        """A JSON record for the journal; expiry as wall-clock time, which survives a restart
        (the monotonic clock does not)."""
        return {"bus": self.bus, "slot": self.slot, "created": self.created_at,
                "expires": now_wall + (self.expires_at - now_mono),
                "functions": [{"id": f.id, "driver": f.driver, "function": f.function,
                               "properties": dict(f.properties)}
                              for f in self.functions.values()]}

    @classmethod
    def from_record(cls, rec: dict[str, Any], now_mono: float, now_wall: float) -> PendingSlot:
        entry = cls(str(rec["bus"]), int(rec["slot"]),
                    now_mono + (float(rec["expires"]) - now_wall),
                    created_at=float(rec.get("created", now_wall)))
        for f in rec["functions"]:
            entry.add(FunctionSpec(str(f["id"]), str(f["driver"]), int(f["function"]),
                                   dict(f.get("properties") or {})))
        return entry


class PendingQueues:
    """The queues of one VM, keyed by (bus, slot)."""

    def __init__(self) -> None:
        self._slots: dict[SlotKey, PendingSlot] = {}

    @classmethod
    def restore(cls, records: list[dict[str, Any]], now_mono: float,
                now_wall: float) -> PendingQueues:
        """Queues from journal records; a record this version cannot read is skipped."""
        queues = cls()
        for rec in records:
            try:
                entry = PendingSlot.from_record(rec, now_mono, now_wall)
            except (KeyError, TypeError, ValueError, Conflict):
                continue
            queues._slots[(entry.bus, entry.slot)] = entry
        return queues

    def __contains__(self, key: SlotKey) -> bool:
        return key in self._slots

    def keys(self) -> set[SlotKey]:
        return set(self._slots)

    def ids(self) -> set[str]:
        return {f.id for p in self._slots.values() for f in p.functions.values()}

    def get(self, key: SlotKey) -> PendingSlot | None:
        return self._slots.get(key)

    def preview(self, spec: FunctionSpec, bus: str, slot: int, ttl: float) -> PendingSlot:
        """The slot's queue as it would be with ``spec`` added; raises on a clash and stores
        nothing (the journal writes it first, then :meth:`put`)."""
        current = self._slots.get((bus, slot))
        if current is None:
            entry = PendingSlot(bus, slot, time.monotonic() + ttl)
        else:
            entry = PendingSlot(bus, slot, current.expires_at, dict(current.functions),
                                current.created_at)
        entry.add(spec)
        return entry

    def put(self, entry: PendingSlot) -> None:
        self._slots[(entry.bus, entry.slot)] = entry

    def pop(self, key: SlotKey) -> PendingSlot | None:
        return self._slots.pop(key, None)

    def expired(self, now: float) -> list[PendingSlot]:
        return [p for p in self._slots.values() if p.expires_at <= now]

    def all(self) -> list[PendingSlot]:
        return list(self._slots.values())
