"""One unplug at a time on an ACPI hotplug controller, with nothing else raising its GPE meanwhile.

Why (see :mod:`qmpfd.hotplug.policies.acpi_pcihp` for QEMU's and the guest's side): the guest
queues one eject request for a slot each time it runs its hotplug method while the slot's "down"
bit is set, and QEMU ejects whatever is in the slot each time. Every ``device_add`` and
``device_del`` on any bus of the controller makes the guest run the method again. So while a
slot's unplug waits for the guest, any other hotplug on the controller can leave a second eject
request queued in the guest, which later removes the slot's next occupant; under load the guest's
hotplug queue runs seconds behind, so no fixed delay after the eject is enough.

The gate: ``device_add`` commands go out concurrently (readers); a ``device_del`` (writer) waits
until none is in flight and the controller has been quiet for :data:`QUIET` seconds (so the
guest's method run for earlier events has read the bits), is sent alone, and holds the gate until
QEMU reports its DEVICE_DELETED (one eject removes the whole slot) or :attr:`hold_limit` passes
(a guest that never answers must not stop the VM's other hotplugs for long). Then the slot's down
bit was seen by exactly one method run: one eject request, no stale one. A waiting unplug goes
before new plugs, so plugs cannot starve it. Commands on buses of other mechanisms pass straight
through. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from qmpfd.errors import Timeout
from qmpfd.qemu.direct import OnReturn
from qmpfd.qemu.link import Command, EventHandler, Link, LinkState

#: Seconds the controller must be quiet before a device_del (the guest's method run for the
#: last event has read the bits by then; it runs in its own ACPI work queue, not behind hotplug).
QUIET = 0.25
#: Longest wait for the gate itself before a command is refused as Timeout.
WAIT_LIMIT = 60.0

Applies = Callable[[str, dict[str, Any]], bool]


class UnplugGate:
    def __init__(self, applies: Applies, hold_limit: float = 5.0, quiet: float = QUIET) -> None:
        self._applies = applies          # (command, arguments) -> on a gated controller?
        self.hold_limit = hold_limit
        self.quiet = quiet
        self._cond = asyncio.Condition()
        self._plugs = 0                  # device_adds in flight
        self._unplugs_waiting = 0
        self._holder: str | None = None  # the device_del target holding the gate
        self._release: asyncio.TimerHandle | None = None
        self._last = 0.0                 # monotonic time of the last gated command's reply
        self._tasks: set[asyncio.Task[None]] = set()

    async def execute(self, cmd: str, args: dict[str, Any],
                      send: Callable[[], Awaitable[Any]]) -> Any:
        if cmd not in ("device_add", "device_del") or not self._applies(cmd, args):
            return await send()
        if cmd == "device_add":
            return await self._plug(send)
        return await self._unplug(str(args.get("id")), send)

    async def execute_batch(self, commands: Sequence[Command],
                            send: Callable[[], Awaitable[list[object]]]) -> list[object]:
        """A batch of device_adds (one slot's functions) passes as that many plugs at once; a
        device_del is never batched (it holds the gate alone until its DEVICE_DELETED)."""
        gated = [cmd for cmd, args in commands
                 if cmd in ("device_add", "device_del") and self._applies(cmd, args)]
        if not gated:
            return await send()
        if "device_del" in gated:
            raise ValueError("device_del is sent alone through the unplug gate, not in a batch")
        outcomes: list[object] = await self._plug(send, len(gated))
        return outcomes

    async def _plug(self, send: Callable[[], Awaitable[Any]], count: int = 1) -> Any:
        if self._holder is not None or self._unplugs_waiting:
            async with self._cond:
                await self._wait(lambda: self._holder is None and not self._unplugs_waiting)
                self._plugs += count
        else:       # the common case: nothing to wait for, so no lock (one thread runs this)
            self._plugs += count
        try:
            return await send()
        finally:
            self._plugs -= count
            self._last = time.monotonic()
            if self._unplugs_waiting:    # only an unplug waits for the plugs in flight
                async with self._cond:
                    self._cond.notify_all()

    async def _unplug(self, target: str, send: Callable[[], Awaitable[Any]]) -> Any:
        async with self._cond:
            self._unplugs_waiting += 1
            try:
                await self._wait(lambda: self._holder is None and not self._plugs)
            finally:
                self._unplugs_waiting -= 1
            self._holder = target
        try:
            await asyncio.sleep(max(0.0, self._last + self.quiet - time.monotonic()))
            result = await send()
        except BaseException:
            await self._free(target)
            raise
        self._last = time.monotonic()
        self._release = asyncio.get_running_loop().call_later(
            self.hold_limit, self._free_soon, target)
        return result

    def _free_soon(self, target: str) -> None:
        task = asyncio.get_running_loop().create_task(self._free(target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self, ready: Callable[[], bool]) -> None:
        if ready():              # the common case: no timer, no task
            return
        try:
            await asyncio.wait_for(self._cond.wait_for(ready), WAIT_LIMIT)
        except TimeoutError:
            raise Timeout(f"another unplug on this VM's ACPI hotplug controller still holds it "
                          f"after {WAIT_LIMIT:g} s") from None

    async def _free(self, target: str) -> None:
        async with self._cond:
            if self._holder != target:
                return
            self._holder = None
            if self._release is not None:
                self._release.cancel()
                self._release = None
            self._last = time.monotonic()
            self._cond.notify_all()

    def handle_event(self, event: dict[str, Any]) -> None:
        """DEVICE_DELETED of the holder frees the gate; a lost connection frees it too."""
        name = event.get("event")
        dev = (event.get("data") or {}).get("device")
        if self._holder is not None and (
                (name == "DEVICE_DELETED" and dev == self._holder)
                or name == "QMPFD_DISCONNECTED"):
            self._free_soon(self._holder)

    @property
    def holder(self) -> str | None:
        return self._holder


class GatedLink:
    """A :class:`~qmpfd.qemu.link.Link` whose hotplug commands pass an :class:`UnplugGate`."""

    def __init__(self, inner: Link, gate: UnplugGate) -> None:
        self.inner = inner
        self.gate = gate
        self.name = inner.name
        inner.subscribe(gate.handle_event)

    @property
    def commands_sent(self) -> int:
        return self.inner.commands_sent

    @commands_sent.setter
    def commands_sent(self, value: int) -> None:
        self.inner.commands_sent = value

    @property
    def on_disconnect(self) -> Callable[[], None] | None:
        return self.inner.on_disconnect

    @on_disconnect.setter
    def on_disconnect(self, handler: Callable[[], None] | None) -> None:
        self.inner.on_disconnect = handler

    @property
    def state(self) -> LinkState:
        return self.inner.state

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def connect(self, timeout: float) -> None:
        await self.inner.connect(timeout)

    async def close(self) -> None:
        await self.inner.close()

    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        return self.inner.subscribe(handler)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None, on_return: OnReturn | None = None
                      ) -> Any:
        return await self.gate.execute(cmd, args or {}, lambda: self.inner.execute(
            cmd, args, timeout=timeout, on_return=on_return))

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        return await self.gate.execute_batch(
            commands, lambda: self.inner.execute_batch(commands, timeout=timeout))
