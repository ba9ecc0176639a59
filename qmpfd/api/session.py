"""One client connection on qmpfd's socket: the server half of the QMP wire protocol.

The session owns framing (JSON objects back to back or one per line, capped in size), the
greeting and capability negotiation, and the ordering of replies. It knows nothing about VMs:
each request is handed to a :class:`Dispatcher`, which returns a value or raises
:class:`~qmpfd.errors.QmpfdError`.

Requests from one client run one after another, like QEMU's own monitor, so a client that sends
several commands without ids still reads replies in order. Replies and events go out in the order
they were produced: events gathered per event-loop iteration into one write, a reply written at
once with the events before it (an operation's last event and its reply are one ``send``, not
two). An attach's reply is produced earlier, once QEMU accepted it (:class:`EarlyReply`): its
event then follows it. A client that stops reading loses its events (and is disconnected) once
:data:`OUTPUT_BACKLOG_LIMIT` bytes wait for it, rather than stalling the daemon or other
clients: an event is never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from qmpfd.access.peer import Peer
from qmpfd.api import wire
from qmpfd.errors import CommandNotFound, InvalidRequest, QmpfdError

log = logging.getLogger("qmpfd.api")

#: bytes written to a client and not yet taken by it (beyond the socket buffer) before an event
#: for it disconnects it as too slow
OUTPUT_BACKLOG_LIMIT = 256 << 10
READ_CHUNK = 65536


Dispatcher = Callable[[str, dict[str, Any], "Session"], Awaitable[Any]]


class EarlyReply:
    """A request's success reply, written before its handler returns: from the callback that
    read QEMU's answer, once what the reply claims holds in QEMU (an attach's last
    ``device_add`` accepted). The handler's bookkeeping after that point (the slot's state,
    its journal end, its event) then runs after the reply instead of before it; it runs
    before this client's next request is read and before any other input is handled (the
    handler's wake-up is already queued), so nobody observes the difference but the clock.

    ``prepare`` makes the reply's bytes (while QEMU works); ``send`` writes them, once. The
    handler's own return value is then not sent again, and a failure it raises after that
    point is logged, not sent: QEMU carried the request out."""

    __slots__ = ("_data", "_request", "_session", "allowed", "sent")

    def __init__(self, session: Session, request: wire.Message) -> None:
        self._session = session
        self._request = request
        self._data: bytes | None = None
        self.sent = False
        #: False where the reply is changed after the handler returns (a tenant's view)
        self.allowed = True

    def prepare(self, value: Any) -> None:
        if self.allowed:
            self._data = wire.encode(wire.return_reply(value, self._request))

    def send(self) -> None:
        if self._data is not None and not self.sent:   # prepared only where allowed
            self.sent = True
            self._session._write_now(self._data)


#: the request being handled in this task, whose reply may be written early
_early_reply: contextvars.ContextVar[EarlyReply | None] = contextvars.ContextVar(
    "qmpfd_early_reply", default=None)


def early_reply() -> EarlyReply | None:
    """The current request's :class:`EarlyReply` (None outside a client's request)."""
    return _early_reply.get()


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
        #: events this client may see (a tenant sees its own VMs' events); None: all
        self.event_filter: Callable[[wire.Message], bool] | None = None
        self._output: list[bytes] = []     # written at the end of this loop iteration

    @property
    def negotiated(self) -> bool:
        return self.state is SessionState.RUNNING

    def offer_event(self, msg: wire.Message,
                    encoded: Callable[[], bytes] | None = None) -> None:
        """Write an event to this client; a client too slow to keep up is dropped.
        ``encoded``: the event's bytes, made once for every client that takes it."""
        if not self.negotiated or (self.event_filter is not None
                                   and not self.event_filter(msg)):
            return
        if self._writer.transport.get_write_buffer_size() > OUTPUT_BACKLOG_LIMIT:
            log.warning("client too slow for events; disconnecting", extra={"peer": self.peer})
            self.close()
            # What it has not taken is dropped: a graceful close would wait for it to read.
            self._writer.transport.abort()
            return
        self._emit(encoded() if encoded is not None else wire.encode(msg))

    def close(self) -> None:
        self.state = SessionState.CLOSING
        self._output.clear()
        self._writer.close()

    def _emit(self, data: bytes) -> None:
        """Queue bytes for the write at the end of this loop iteration."""
        if not self._output:
            asyncio.get_running_loop().call_soon(self._flush)
        self._output.append(data)

    def _flush(self) -> None:
        if self._output and self.state is not SessionState.CLOSING:
            data = b"".join(self._output) if len(self._output) > 1 else self._output[0]
            self._writer.write(data)
        self._output.clear()

    async def run(self) -> None:
        splitter = wire.JsonSplitter(self._max_line)
        try:
            await self._send(wire.greeting())
            while self.state is not SessionState.CLOSING:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for message in splitter.feed(data):
                    reply: wire.Message | None
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
                    if reply is not None:
                        await self._send(reply)
                    elif self._writer.transport.get_write_buffer_size() > 0:
                        await self._writer.drain()    # the reply went early: same pacing
        except ConnectionError:
            pass
        finally:
            self._flush()
            self.state = SessionState.CLOSING
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _handle(self, line: bytes) -> wire.Message | None:
        """The reply to send, or None when it was written already (:class:`EarlyReply`)."""
        request: wire.Message | None = None
        early: EarlyReply | None = None
        try:
            request = wire.parse_request(line)
            name, args = wire.check_request(request)
            nul = wire.find_nul(args) if wire.may_hold_nul(line) else None
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
            early = EarlyReply(self, request)
            token = _early_reply.set(early)
            try:
                value = await self._dispatch(name, args, self)
            finally:
                _early_reply.reset(token)
            return None if early.sent else wire.return_reply(value, request)
        except QmpfdError as exc:
            if early is not None and early.sent:
                log.error("a request failed after its success was answered: %s", exc.desc)
                return None
            return wire.reply_for_error(exc, request)
        except Exception as exc:  # a bug must not take the connection down with it
            log.exception("internal error handling a request")
            if early is not None and early.sent:
                return None
            return wire.reply_for_error(QmpfdError(f"internal error: {exc}"), request)

    async def _send(self, msg: wire.Message) -> None:
        """A reply: written at once, in one write with the events produced before it (waiting
        for the end of the loop iteration would put one more turn between QEMU's answer and
        the client's); the next request is read once the client takes its output (its own
        replies pace it, as before)."""
        self._write_now(wire.encode(msg))
        if self._writer.transport.get_write_buffer_size() > 0:
            await self._writer.drain()

    def _write_now(self, data: bytes) -> None:
        self._output.append(data)   # a flush already scheduled finds nothing left
        self._flush()
