"""What the operations on one VM need from it: :class:`VmContext`.

:class:`~qmpfd.vm.managed.ManagedVm` owns the parts (link, slot table, deletion tracker, queues,
journal, events) and provides this; :mod:`qmpfd.vm.operations`, :mod:`qmpfd.vm.queues`,
:mod:`qmpfd.vm.reconcile` and :mod:`qmpfd.vm.removal` are written against it, so they do not
import the coordinator and the coordinator imports them: no import circle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol

from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.policies import Policy
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.link import Link
from qmpfd.state.journal import Journal, Operation
from qmpfd.vm.events import VmEvents


class VmContext(Protocol):
    name: str
    table: SlotTable            # every slot's state
    journal: Journal            # operations in flight, durable
    events: VmEvents            # what clients hear
    alloc: asyncio.Lock         # slot choice and claims are decided under it
    tracker: DeletionTracker    # DEVICE_DELETED waits
    link: Link                  # QEMU (replaced on reconnect)
    pending_ttl: float
    slots_from_top: bool        # libvirt-run VMs: qmpfd takes slots from the top

    def policies(self) -> dict[str, Policy]:
        """The policy of each bus."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` as a task the VM owns (cancelled when it stops)."""
        ...

    async def removed(self, ids: list[str]) -> list[str]:
        """QEMU deleted ``ids``: give back the host functions held for them."""
        ...

    async def refresh(self) -> None:
        """Read QEMU's topology again."""
        ...

    def operation_failed(self, op: Operation, reason: str, *, recovered: bool = False) -> None:
        """An operation ended without doing what it was asked, after its request was answered."""
        ...
