"""Every event qmpfd emits about a VM, built in one place so names and members stay consistent.

The payloads are the contract's event data; the API layer adds the QMP envelope (``event``,
``timestamp``) and sends them to every client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Emit = Callable[[str, dict[str, Any]], None]


class VmEvents:
    def __init__(self, vm: str, emit: Emit) -> None:
        self.vm = vm
        self._emit = emit

    def _slot(self, name: str, bus: str, slot: int, ids: Sequence[str], recovered: bool,
              **extra: Any) -> None:
        data: dict[str, Any] = {"vm": self.vm, "bus": bus, "slot": slot, "ids": list(ids),
                                **extra}
        if recovered:
            data["recovered"] = True
        self._emit(name, data)

    def attached(self, bus: str, slot: int, ids: Sequence[str], *,
                 recovered: bool = False) -> None:
        self._slot("SLOT_ATTACHED", bus, slot, ids, recovered)

    def attach_failed(self, bus: str, slot: int, ids: Sequence[str], reason: str, *,
                      recovered: bool = False) -> None:
        self._slot("SLOT_ATTACH_FAILED", bus, slot, ids, recovered, reason=reason)

    def detached(self, bus: str, slot: int, ids: Sequence[str], *, seconds: float | None = None,
                 recovered: bool = False) -> None:
        extra = {"seconds": seconds} if seconds is not None else {}
        self._slot("SLOT_DETACHED", bus, slot, ids, recovered, **extra)

    def detach_failed(self, bus: str, slot: int, ids: Sequence[str], reason: str, *,
                      recovered: bool = False) -> None:
        self._slot("SLOT_DETACH_FAILED", bus, slot, ids, recovered, reason=reason)

    def ejected(self, bus: str, slot: int, ids: Sequence[str]) -> None:
        """QEMU removed these functions without a request from qmpfd (the guest ejected the
        slot, or a raw device_del)."""
        self._slot("SLOT_EJECTED", bus, slot, ids, False,
                   reason="removed by QEMU without a request from qmpfd")

    def orphaned(self, bus: str, slot: int, ids: Sequence[str]) -> None:
        self._slot("SLOT_ORPHANED", bus, slot, ids, False)

    def queued(self, bus: str, slot: int, function: int, dev_id: str) -> None:
        self._emit("FUNCTION_QUEUED", {"vm": self.vm, "bus": bus, "slot": slot,
                                       "function": function, "id": dev_id})

    def queue_cancelled(self, bus: str, slot: int, ids: Sequence[str]) -> None:
        self._slot("PENDING_CANCELLED", bus, slot, ids, False)

    def queue_expired(self, bus: str, slot: int, ids: Sequence[str]) -> None:
        self._slot("PENDING_EXPIRED", bus, slot, ids, False)

    def disconnected(self, qmp: str) -> None:
        self._emit("VM_DISCONNECTED", {"vm": self.vm, "qmp": qmp})

    def reconnected(self, qmp: str) -> None:
        self._emit("VM_RECONNECTED", {"vm": self.vm, "qmp": qmp})
