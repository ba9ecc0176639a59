"""One slot on its way out of QEMU (:class:`Unplug`): a detach, a rollback that must wait for
the guest, or an unplug found in flight after a restart. It ends when every id has had its
DEVICE_DELETED; whoever ends it gives back the host functions held for them, once, there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from qmpfd.errors import VmGone
from qmpfd.hotplug.slots import Slot, SlotKey
from qmpfd.state.journal import Operation
from qmpfd.vm.context import VmContext

log = logging.getLogger("qmpfd.vm")


@dataclass
class Unplug:
    """One slot on its way out of QEMU: ends when every id has had its DEVICE_DELETED."""

    vm: VmContext
    key: SlotKey
    ids: list[str]
    op: Operation | None
    attach: bool = False                 # a rollback (no SLOT_DETACHED at the end)
    started: float = 0.0
    done: asyncio.Future[None] | None = None
    recovered: bool = False              # found in flight after a restart or a reconnect
    owner: Slot | None = None            # the slot's work this unplug ends (set by watch)
    #: the host functions given back once every id is gone ([] if none, or if it failed)
    host_released: asyncio.Future[list[str]] | None = None

    def watch(self) -> asyncio.Future[None]:
        self.started = self.started or time.monotonic()
        self.owner = self.owner or self.vm.table.claim(self.key)
        fut = self.done if self.done is not None else self.vm.tracker.expect(self.ids)
        self.done = fut
        self.host_released = asyncio.get_running_loop().create_future()
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, f: asyncio.Future[None]) -> None:
        vm = self.vm
        vm.table.unplug_ended(self.key, self.owner)
        if f.cancelled() or f.exception() is not None:
            assert self.host_released is not None
            self.host_released.set_result([])
        if f.cancelled():
            return
        exc = f.exception()
        if exc is not None:
            # Lost connection: the journal keeps op and reconcile() resumes the wait.
            # Guest refusal: the functions stay (the slot is present again); the operation is
            # over, and a client that is no longer waiting learns it from the event.
            log.warning("unplug failed", extra={"vm": vm.name, "error": str(exc)})
            if self.op is not None and not isinstance(exc, VmGone):
                vm.journal.end(self.op)
                vm.operation_failed(self.op, str(exc), recovered=self.recovered)
            return
        if self.op is not None:
            vm.journal.end(self.op)
        vm.spawn(self._give_back(), "release")
        if self.attach:
            vm.events.attach_failed(self.key[0], self.key[1], self.ids,
                                    "interrupted; rolled back", recovered=self.recovered)
        else:
            vm.events.detached(self.key[0], self.key[1], self.ids,
                               seconds=round(time.monotonic() - self.started, 3),
                               recovered=self.recovered)

    async def _give_back(self) -> None:
        """The one give-back of the host functions held for these ids (a detach's reply
        reports it through :attr:`host_released`)."""
        assert self.host_released is not None
        try:
            released = await self.vm.removed(self.ids)
        except BaseException:
            self.host_released.set_result([])
            raise
        self.host_released.set_result(released)
