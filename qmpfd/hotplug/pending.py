"""Per-slot queues for incremental attach (``function-add``).

A non-zero function waits here, not in QEMU, until function 0 of its slot arrives; the queue is
then flushed as one attach. Keeping queued functions out of QEMU means a queue that is cancelled
or expires needs no guest cooperation to clean up.
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

    def describe(self, vm: str) -> dict[str, Any]:
        return {
            "vm": vm, "bus": self.bus, "slot": self.slot,
            "functions": [{"function": f.function, "id": f.id, "driver": f.driver}
                          for f in sorted(self.functions.values(), key=lambda f: f.function)],
            "expires-in": max(0.0, round(self.expires_at - time.monotonic(), 1)),
        }


class PendingQueues:
    """The queues of one VM, keyed by (bus, slot)."""

    def __init__(self) -> None:
        self._slots: dict[SlotKey, PendingSlot] = {}

    def __contains__(self, key: SlotKey) -> bool:
        return key in self._slots

    def keys(self) -> set[SlotKey]:
        return set(self._slots)

    def ids(self) -> set[str]:
        return {f.id for p in self._slots.values() for f in p.functions.values()}

    def get(self, key: SlotKey) -> PendingSlot | None:
        return self._slots.get(key)

    def queue(self, spec: FunctionSpec, bus: str, slot: int, ttl: float) -> PendingSlot:
        entry = self._slots.get((bus, slot))
        if entry is None:
            entry = PendingSlot(bus, slot, time.monotonic() + ttl)
        entry.add(spec)  # raises before anything is stored
        self._slots[(bus, slot)] = entry
        return entry

    def pop(self, key: SlotKey) -> PendingSlot | None:
        return self._slots.pop(key, None)

    def expired(self, now: float) -> list[PendingSlot]:
        return [p for p in self._slots.values() if p.expires_at <= now]

    def all(self) -> list[PendingSlot]:
        return list(self._slots.values())
