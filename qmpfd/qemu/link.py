"""One QMP link to one QEMU, built on ``qemu.qmp.QMPClient``.

It adds what the daemon needs above the library: an explicit :class:`LinkState`, every command
bounded by a timeout, QEMU's error replies turned into :class:`~qmpfd.errors.QemuError`, a closed
socket turned into :class:`~qmpfd.errors.VmGone`, and QEMU's events handed to subscribers as they
are read, in QEMU's order (the slot table and the deletion tracker follow ``DEVICE_DELETED``
through it).

Commands may be issued concurrently: replies are matched to requests by id (in the socket's
callback, :mod:`qmpfd.qemu.router`), and QEMU runs a monitor's commands in the order they
arrive. The executor relies on that order: a ``device_del`` sent after a ``device_add`` whose
reply is late still finds the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ExecuteError, Runstate
from qemu.qmp.error import QMPError

from qmpfd.errors import QemuError, QmpfdError, Timeout, VmGone
from qmpfd.qemu.direct import DirectClient, OnReturn, Sent
from qmpfd.qemu.socketfile import nothing_listens, socket_identity_problem

log = logging.getLogger("qmpfd.vm")

EventHandler = Callable[[dict[str, Any]], None]
#: A QMP command and its arguments.
Command = tuple[str, dict[str, Any]]


class EventFanout:
    """The subscribers of one link's QEMU events (both kinds of link use it): each gets every
    event; one that fails is logged and the others still get theirs."""

    def __init__(self, vm: str) -> None:
        self._vm = vm
        self._handlers: list[EventHandler] = []

    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        """Call ``handler`` for every QEMU event; returns the function that unsubscribes."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler) if handler in self._handlers else None

    def deliver(self, event: dict[str, Any]) -> None:
        for handler in list(self._handlers):
            try:
                handler(dict(event))
            except Exception:
                log.exception("event handler failed", extra={"vm": self._vm})


class Link(Protocol):
    """What qmpfd needs from a connection to one QEMU: :class:`QmpLink` (its QMP socket) or
    :class:`qmpfd.qemu.libvirt_link.LibvirtLink` (through libvirt, for VMs libvirt runs)."""

    name: str
    commands_sent: int
    on_disconnect: Callable[[], None] | None

    @property
    def state(self) -> LinkState: ...

    @property
    def connected(self) -> bool: ...

    async def connect(self, timeout: float) -> None: ...

    async def close(self) -> None: ...

    def subscribe(self, handler: EventHandler) -> Callable[[], None]: ...

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None, on_return: OnReturn | None = None
                      ) -> Any:
        """The command's return value; QemuError, Timeout or VmGone raised. ``on_return``:
        called once QEMU returned success, before the caller resumes and before anything
        QEMU sent after that reply is handled (:data:`~qmpfd.qemu.direct.OnReturn`)."""
        ...

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        """Send ``commands`` in this order, together, and collect their outcomes in the same
        order: each the command's return value, or the QmpfdError it ended in (QemuError,
        Timeout, VmGone), returned, not raised. ``timeout`` bounds the whole batch."""
        ...


async def execute_together(execute: Callable[..., Awaitable[Any]], commands: Sequence[Command],
                           timeout: float | None = None) -> list[object]:
    """:meth:`Link.execute_batch` for a link that cannot write several commands itself: one
    ``execute`` each, concurrently (QEMU still runs them in the order they were sent)."""
    results = await asyncio.gather(*(execute(cmd, args, timeout=timeout)
                                     for cmd, args in commands), return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException) and not isinstance(res, QmpfdError):
            raise res
    return list(results)


class LinkState(enum.Enum):
    NEW = "new"              # not connected yet
    UP = "up"                # greeting done, commands and events flow
    DOWN = "down"            # the socket closed or the connection failed
    CLOSED = "closed"        # closed by qmpfd (VM removed, shutdown)


class QmpLink:
    def __init__(self, name: str, socket_path: Path, command_timeout: float) -> None:
        self.name = name
        self.socket_path = socket_path
        self.command_timeout = command_timeout
        self._client = DirectClient(f"qmpfd-{name}")
        self._events = EventFanout(name)
        # Delivered in the socket's callback, in QEMU's order (no task between).
        self._client.on_event = self._events.deliver
        self._watch: asyncio.Task[None] | None = None
        self.on_disconnect: Callable[[], None] | None = None

        self._closed = False
        self._failed = False        # the connection attempt failed: DOWN, not NEW
        #: QMP commands sent on this link (counted: the benchmarks report it per request).
        self.commands_sent = 0

    @property
    def state(self) -> LinkState:
        if self._closed:
            return LinkState.CLOSED
        runstate = self._client.runstate
        if runstate is Runstate.RUNNING:
            return LinkState.UP
        return LinkState.NEW if runstate is Runstate.IDLE and self._watch is None \
            and not self._failed else LinkState.DOWN

    @property
    def connected(self) -> bool:
        return self.state is LinkState.UP

    async def connect(self, timeout: float) -> None:
        problem = socket_identity_problem(self.socket_path)
        if problem is not None:     # checked again at every (re)connection, not only at vm-add
            self._failed = True
            raise VmGone(f"VM '{self.name}': QMP socket {self.socket_path} {problem}")
        try:
            await asyncio.wait_for(self._client.connect(str(self.socket_path)), timeout)
        except TimeoutError as exc:
            self._failed = True
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            raise Timeout(f"VM '{self.name}': no QMP greeting from {self.socket_path} "
                          f"within {timeout:g} s") from exc
        except (QMPError, OSError) as exc:
            self._failed = True
            raise VmGone(f"VM '{self.name}': cannot connect to QMP socket "
                         f"{self.socket_path}: {exc}") from exc
        self._watch = asyncio.create_task(self._watch_runstate(), name=f"watch-{self.name}")

    async def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        return self._events.subscribe(handler)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None, on_return: OnReturn | None = None
                      ) -> Any:
        # ``connected``, read without its two properties (this is every command's path)
        if self._closed or self._client.runstate is not Runstate.RUNNING:
            raise self._not_connected()
        limit = self.command_timeout if timeout is None else timeout
        self.commands_sent += 1
        try:
            return await self._client.execute(cmd, args, on_return=on_return, timeout=limit)
        except (ExecuteError, TimeoutError, QMPError, OSError, EOFError) as exc:
            raise self._failure(exc, cmd, limit) from exc

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        """Every command written first, in order, then the replies read in that order (QEMU
        answers a monitor's commands in the order they came): no task per command, and
        replies that arrived together are taken in one wake-up."""
        if not self.connected:
            raise self._not_connected()
        limit = self.command_timeout if timeout is None else timeout
        self.commands_sent += len(commands)
        sent: list[Sent] = []
        try:
            for cmd, args in commands:
                sent.append(self._client.send_now(cmd, args, timeout=limit))
        except (QMPError, OSError) as exc:
            for msg in sent:
                self._client.forget(msg)
            return [self._failure(exc, cmd, limit) for cmd, _ in commands]
        outcomes: list[object] = []
        expired: TimeoutError | None = None
        for msg, (cmd, _) in zip(sent, commands, strict=True):
            if expired is not None:
                # QEMU answers in order: once one is overdue, none after it is counted on
                # (their deadlines are microseconds apart; the batch has one time limit).
                self._client.forget(msg)
                outcomes.append(self._failure(expired, cmd, limit))
                continue
            try:
                outcomes.append(await self._client.returned(msg))
            except TimeoutError as exc:
                expired = exc
                outcomes.append(self._failure(exc, cmd, limit))
            except (ExecuteError, QMPError, OSError, EOFError) as exc:
                outcomes.append(self._failure(exc, cmd, limit))
        return outcomes

    def _not_connected(self) -> VmGone:
        return VmGone(f"VM '{self.name}' is not connected (QMP socket {self.socket_path})")

    def _failure(self, exc: BaseException, cmd: str, limit: float) -> QmpfdError:
        """What a command's exception from the library means to qmpfd."""
        if isinstance(exc, ExecuteError):
            return QemuError(f"{exc.error_class}: {exc}", exc.error_class)
        if isinstance(exc, TimeoutError):
            return Timeout(f"VM '{self.name}': QEMU did not answer {cmd} within {limit:g} s")
        return VmGone(f"VM '{self.name}': QMP connection lost during {cmd}: {exc}")

    async def _watch_runstate(self) -> None:
        while True:
            state = await self._client.runstate_changed()
            if state is not Runstate.RUNNING:
                log.warning("QMP connection lost", extra={"vm": self.name})
                # Wake waiters (they see `connected` False) and let the owner react.
                self._events.deliver({"event": "QMPFD_DISCONNECTED", "data": {}})
                if self.on_disconnect is not None:
                    self.on_disconnect()
                return


async def nobody_listens(path: Path, timeout: float) -> bool:
    """True only when nothing listens on the QMP socket ``path``: the file is gone or refuses
    connections, which a living QEMU never does; any doubt (slow, busy) is False."""
    return await asyncio.to_thread(nothing_listens, path, timeout)
