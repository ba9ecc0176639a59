"""Waiting for DEVICE_DELETED.

QEMU emits DEVICE_DELETED once per removed device and once per child path (for example
``/machine/peripheral/ID/virtio-backend``) without a ``device`` member; only the ones that carry
``device`` say a function is gone. Waits are registered *before* device_del is sent, so an event
that arrives quickly is never missed.

A deletion nobody waits for is *unasked*: the guest ejected a slot on its own (under ACPI it may
act on a stale eject request, see :mod:`qmpfd.hotplug.policies.acpi_pcihp`) or someone sent a raw
``device_del``. Subscribers hear which it was. Every deletion is also numbered, so code that
learns of a ``device_add``'s success after QEMU already deleted the device (events and replies
are read by different tasks) can tell, and never records a device QEMU no longer holds.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import Any

from qmpfd.errors import QemuError, VmGone

#: Deletions remembered for :meth:`DeletionTracker.deleted_since` (far more than one request
#: can see between sending a device_add and reading its reply).
REMEMBERED = 4096


class DeletionTracker:
    """Turns a VM's event stream into futures that complete when sets of ids are deleted."""

    def __init__(self) -> None:
        self._waits: list[tuple[set[str], asyncio.Future[None]]] = []
        #: Called with (id, asked) for each deleted id, after waiters are updated (slot
        #: bookkeeping hooks in here); ``asked``: some wait expected it.
        self.on_deleted: list[Callable[[str, bool], None]] = []
        #: Number of the last deletion seen, and the recent ones as (number, id).
        self.seq = 0
        self._recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=REMEMBERED)

    def deleted_since(self, mark: int) -> set[str]:
        """Ids deleted after :attr:`seq` was ``mark``: read from the newest back to the mark
        (asked after every reply to a device_add; usually nothing is newer, and a scan of all
        :data:`REMEMBERED` would cost each attach more the longer the daemon runs)."""
        ids: set[str] = set()
        for n, dev in reversed(self._recent):
            if n <= mark:
                break
            ids.add(dev)
        return ids

    def handle_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "DEVICE_DELETED":
            dev = data.get("device")
            if not dev:
                return  # a child path such as .../virtio-backend, not a function
            self.seq += 1
            self._recent.append((self.seq, dev))
            asked = False
            for remaining, fut in self._waits:
                if dev in remaining:
                    asked = True
                    remaining.discard(dev)
                if not remaining and not fut.done():
                    fut.set_result(None)
            for cb in list(self.on_deleted):
                cb(dev, asked)
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
