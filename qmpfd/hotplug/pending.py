"""Per-slot queues for incremental attach (``function-add``).

A non-zero function waits here, not in QEMU, until function 0 of its slot arrives; the queue is
then flushed as one attach. Keeping queued functions out of QEMU means a queue that is cancelled
or expires needs no guest cooperation to clean up.

A queue belongs to its slot (:class:`~qmpfd.hotplug.slot.Slot`, state QUEUED). Queues are also
kept in the journal (:meth:`PendingSlot.to_record`), so a restarted qmpfd still flushes them when
function 0 arrives: a management plane that queued function 1 before an upgrade must not see
function 0 attached alone afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qmpfd.errors import Conflict
from qmpfd.hotplug.spec import FunctionSpec

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


def restore(records: list[dict[str, Any]], now_mono: float,
            now_wall: float) -> list[PendingSlot]:
    """Queues from journal records; a record this version cannot read is skipped."""
    out = []
    for rec in records:
        try:
            out.append(PendingSlot.from_record(rec, now_mono, now_wall))
        except (KeyError, TypeError, ValueError, Conflict):
            continue
    return out


def preview(current: PendingSlot | None, spec: FunctionSpec, bus: str, slot: int,
            ttl: float) -> PendingSlot:
    """The slot's queue as it would be with ``spec`` added; raises on a clash and changes
    nothing (the journal writes it first; then the slot takes it)."""
    if current is None:
        entry = PendingSlot(bus, slot, time.monotonic() + ttl)
    else:
        entry = PendingSlot(bus, slot, current.expires_at, dict(current.functions),
                            current.created_at)
    entry.add(spec)
    return entry
