"""One QMP link to one QEMU, built on ``qemu.qmp.QMPClient``.

It adds what the daemon needs above the library: an explicit :class:`LinkState`, every command
bounded by a timeout, QEMU's error replies turned into :class:`~qmpfd.errors.QemuError`, a closed
socket turned into :class:`~qmpfd.errors.VmGone`, and QEMU's events handed to subscribers (the
slot table and the deletion tracker follow ``DEVICE_DELETED`` through it).

Commands may be issued concurrently: the library matches replies to requests by id, and QEMU
runs a monitor's commands in the order they arrive. The executor relies on that order: a
``device_del`` sent after a ``device_add`` whose reply is late still finds the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, Runstate
from qemu.qmp.error import QMPError
from qemu.qmp.models import ErrorResponse
from qemu.qmp.qmp_client import BadReplyError

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.qemu.socketfile import nothing_listens, socket_identity_problem

log = logging.getLogger("qmpfd.vm")

EventHandler = Callable[[dict[str, Any]], None]


class _Client(QMPClient):
    """QMPClient whose message hooks format a message only when it will be logged, which
    makes a command's JSON once (:meth:`execute`) and writes it without a hop through its
    writer task (:meth:`_issue`).

    The library's hooks log every message at debug level with ``str(msg)`` evaluated first,
    i.e. a JSON encoding of every QMP message, logged or not. qom-list and query-pci replies
    are large: with 100 VMs that was a sixth of qmpfd's CPU time (bench/, scale). The hooks
    are the library's documented extension points for subclasses.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Message) -> Message:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object:
        """The library's ``execute``, with the command made into JSON once. The library builds
        a Message (serialised), copies it in ``execute_msg`` (serialised again, through the
        Mapping interface) and serialises it a third time to send it once the id is set: about
        two thirds of a command's cost before it leaves (bench/profile.md). Same checks, same
        errors: not connected is the library's own StateError, QEMU's error reply an
        ExecuteError, a reply with neither member a BadReplyError."""
        if self.runstate is not Runstate.RUNNING:
            return await super().execute(cmd, arguments, oob)
        msg = Message({"exec-oob" if oob else "execute": cmd}, eager=False)
        if arguments is not None:
            msg["arguments"] = arguments
        msg["id"] = self._get_exec_id()
        reply = await self._reply(await self._issue(msg))
        if "error" in reply:
            try:
                error = ErrorResponse(reply)
            except (KeyError, TypeError) as err:
                raise BadReplyError("QMP error reply is malformed", reply, msg) from err
            raise ExecuteError(error, msg, reply)
        if "return" not in reply:
            raise BadReplyError("QMP reply is missing a 'error' or 'return' member", reply, msg)
        return reply["return"]

    async def _issue(self, msg: Message) -> str | None:
        """The library's ``_issue``, writing the command at once instead of handing it to its
        writer task: one event-loop turn less between a request and QEMU (a command's turns
        are most of what an attach adds to QEMU's own time; bench/profile.md). The order is
        kept (commands are written in call order, on the loop's thread), so is the matching
        (the reply's queue exists before the bytes leave), and the bytes go through the
        library's own send path (``_cb_outbound``, ``_do_send``). A failed write reaches the
        caller, not the writer task; a lost connection still interrupts every pending reply
        (the reader task's disconnect)."""
        msg_id = msg["id"] if "id" in msg else None
        assert msg_id is None or isinstance(msg_id, str)
        self._pending[msg_id] = asyncio.Queue(maxsize=1)
        try:
            self._do_send(self._cb_outbound(msg))
        except BaseException:
            del self._pending[msg_id]
            raise
        return msg_id


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
                      timeout: float | None = None) -> Any: ...


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
        self._client = _Client(f"qmpfd-{name}")
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._events = EventFanout(name)
        self._pump: asyncio.Task[None] | None = None
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
        return LinkState.NEW if runstate is Runstate.IDLE and self._pump is None \
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
        self._pump = asyncio.create_task(self._pump_events(), name=f"events-{self.name}")
        self._watch = asyncio.create_task(self._watch_runstate(), name=f"watch-{self.name}")

    async def close(self) -> None:
        self._closed = True
        for task in (self._pump, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        return self._events.subscribe(handler)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        if not self.connected:
            raise VmGone(f"VM '{self.name}' is not connected (QMP socket {self.socket_path})")
        limit = self.command_timeout if timeout is None else timeout
        self.commands_sent += 1
        try:
            async with asyncio.timeout(limit):   # no extra task per command (wait_for makes one)
                return await self._client.execute(cmd, args)
        except ExecuteError as exc:
            raise QemuError(f"{exc.error_class}: {exc}", exc.error_class) from exc
        except TimeoutError as exc:
            raise Timeout(f"VM '{self.name}': QEMU did not answer {cmd} within {limit:g} s") \
                from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VmGone(f"VM '{self.name}': QMP connection lost during {cmd}: {exc}") from exc

    async def _pump_events(self) -> None:
        async for event in self._listener:
            self._events.deliver(dict(event))

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
