"""Waiting for DEVICE_DELETED.

QEMU emits DEVICE_DELETED once per removed device and once per child path (for example
``/machine/peripheral/ID/virtio-backend``) without a ``device`` member; only the ones that carry
``device`` say a function is gone. Waits are registered *before* device_del is sent, so an event
that arrives quickly is never missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from qmpfd.errors import QemuError, VmGone


class DeletionTracker:
    """Turns a VM's event stream into futures that complete when sets of ids are deleted."""

    def __init__(self) -> None:
        self._waits: list[tuple[set[str], asyncio.Future[None]]] = []
        #: Called with each deleted id, after waiters are updated (slot bookkeeping hooks in here).
        self.on_deleted: list[Callable[[str], None]] = []

    def handle_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "DEVICE_DELETED":
            dev = data.get("device")
            if not dev:
                return  # a child path such as .../virtio-backend, not a function
            for remaining, fut in self._waits:
                remaining.discard(dev)
                if not remaining and not fut.done():
                    fut.set_result(None)
            for cb in list(self.on_deleted):
                cb(dev)
        elif name == "DEVICE_UNPLUG_GUEST_ERROR":
            dev = data.get("device")
            for remaining, fut in self._waits:
                if dev in remaining and not fut.done():
                    fut.set_exception(QemuError(
                        f"guest refused to unplug '{dev}' (DEVICE_UNPLUG_GUEST_ERROR)"))
        elif name == "QMPFD_DISCONNECTED":
            for _, fut in self._waits:
                if not fut.done():
                    fut.set_exception(VmGone("QMP connection lost while waiting for "
                                             "DEVICE_DELETED"))

    def expect(self, ids: Iterable[str]) -> asyncio.Future[None]:
        """A future done when every id in ``ids`` has been deleted."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        remaining = set(ids)
        if not remaining:
            fut.set_result(None)
            return fut
        entry = (remaining, fut)
        self._waits.append(entry)
        fut.add_done_callback(lambda _f: self._waits.remove(entry))
        return fut

    def pending(self, fut: asyncio.Future[None]) -> set[str]:
        for remaining, f in self._waits:
            if f is fut:
                return set(remaining)
        return set()
