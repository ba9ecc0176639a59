"""One client connection on qmpfd's socket: the server half of the QMP wire protocol.

The session owns framing (JSON objects back to back or one per line, capped in size), the
greeting and capability negotiation, and the ordering of replies. It knows nothing about VMs:
each request is handed to a :class:`Dispatcher`, which returns a value or raises
:class:`~qmpfd.errors.QmpfdError`.

Requests from one client run one after another, like QEMU's own monitor, so a client that sends
several commands without ids still reads replies in order. Events are queued per session and written
by their own task; a client that stops reading loses its events (and is disconnected) rather than
stalling the daemon or other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from qmpfd.access.peer import Peer
from qmpfd.api import wire
from qmpfd.errors import CommandNotFound, InvalidRequest, QmpfdError

log = logging.getLogger("qmpfd.api")

EVENT_QUEUE_LIMIT = 1024
READ_CHUNK = 65536


Dispatcher = Callable[[str, dict[str, Any], "Session"], Awaitable[Any]]


class SessionState(enum.Enum):
    GREETING = "greeting"        # greeting sent, waiting for qmp_capabilities
    RUNNING = "running"          # negotiated: commands and events flow
    CLOSING = "closing"


class Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dispatch: Dispatcher,
        peer: Peer,
        max_line: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._dispatch = dispatch
        self.peer = peer
        self._max_line = max_line
        self.state = SessionState.GREETING
        self._events: asyncio.Queue[wire.Message] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        #: events this client may see (a tenant sees its own VMs' events); None: all
        self.event_filter: Callable[[wire.Message], bool] | None = None
        self._write_lock = asyncio.Lock()

    @property
    def negotiated(self) -> bool:
        return self.state is SessionState.RUNNING

    def offer_event(self, msg: wire.Message) -> None:
        """Queue an event for this client; a client too slow to keep up is dropped."""
        if not self.negotiated or (self.event_filter is not None
                                   and not self.event_filter(msg)):
            return
        try:
            self._events.put_nowait(msg)
        except asyncio.QueueFull:
            log.warning("client too slow for events; disconnecting", extra={"peer": self.peer})
            self.close()

    def close(self) -> None:
        self.state = SessionState.CLOSING
        self._writer.close()

    async def run(self) -> None:
        event_task = asyncio.create_task(self._event_writer())
        splitter = wire.JsonSplitter(self._max_line)
        try:
            await self._send(wire.greeting())
            while self.state is not SessionState.CLOSING:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for message in splitter.feed(data):
                    if isinstance(message, wire.Oversized):
                        reply = wire.error_reply(
                            "GenericError",
                            f"request exceeds the {self._max_line}-byte message limit")
                    elif isinstance(message, wire.TooDeep):
                        reply = wire.reply_for_error(InvalidRequest(
                            f"{message.path()}: nested deeper than {wire.MAX_DEPTH} levels"),
                            None)
                    else:
                        reply = await self._handle(message)
                    await self._send(reply)
        except ConnectionError:
            pass
        finally:
            self.state = SessionState.CLOSING
            event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await event_task
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _handle(self, line: bytes) -> wire.Message:
        request: wire.Message | None = None
        try:
            request = wire.parse_request(line)
            name, args = wire.check_request(request)
            nul = wire.find_nul(args)
            if nul is not None:
                raise InvalidRequest(f"{nul}: contains a NUL byte")
            if not self.negotiated:
                if name != "qmp_capabilities":
                    raise CommandNotFound(
                        "Expecting capabilities negotiation with 'qmp_capabilities'")
                wire.check_capabilities(args)
                self.state = SessionState.RUNNING
                return wire.return_reply({}, request)
            if name == "qmp_capabilities":
                raise CommandNotFound("Capabilities negotiation is already complete, command "
                                      "ignored")
            value = await self._dispatch(name, args, self)
            return wire.return_reply(value, request)
        except QmpfdError as exc:
            return wire.reply_for_error(exc, request)
        except Exception as exc:  # a bug must not take the connection down with it
            log.exception("internal error handling a request")
            return wire.reply_for_error(QmpfdError(f"internal error: {exc}"), request)

    async def _send(self, msg: wire.Message) -> None:
        async with self._write_lock:
            self._writer.write(wire.encode(msg))
            await self._writer.drain()

    async def _event_writer(self) -> None:
        while True:
            msg = await self._events.get()
            try:
                await asyncio.wait_for(self._send(msg), timeout=10)
            except (ConnectionError, TimeoutError):
                self.close()
                return
