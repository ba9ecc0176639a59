"""QEMU's messages taken off the socket as they arrive, once a QMP session runs.

qemu.qmp reads each message in its reader task (a ``StreamReader.readline``, a ``Message``,
its ``_on_message``) and hands a reply to the waiting command through a queue and an event to
a listener's queue: two event-loop turns between QEMU's bytes and the code that waits for
them, three for an event (the listener's reader is another task). :class:`MessageRouter` sits
between the socket and the library's stream protocol and routes each complete message in the
callback that received it: a reply into its command's queue (one turn to the waiting command),
an event to the link's subscribers at once. What it cannot route (a reply nobody waits for, a
line that is not a JSON object) goes on to the library's stream unchanged, so the library
treats it as it always did (drops it with a warning, or ends the session); end of file and a
lost connection go the same way, and the library's reader task, still waiting on that stream,
notices them and disconnects as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

#: Routes one message; False when it could not, and the library's stream should have it.
Route = Callable[[dict[str, Any]], bool]


class MessageRouter(asyncio.Protocol):
    """The socket's protocol while a session runs: ``route`` gets each message QEMU sends
    (QEMU ends each with CRLF, as the library's ``readline`` expects); ``stream`` (the
    library's ``StreamReaderProtocol``) gets the rest, and everything about the connection.
    A message longer than ``limit`` (the library's read limit) is the library's to refuse:
    it and all that follows go to ``stream``, which ends the session as it always did."""

    def __init__(self, stream: asyncio.BaseProtocol, route: Route, limit: int) -> None:
        self._stream = stream
        self._route = route
        self._limit = limit
        self._partial: list[bytes] = []     # a message's pieces until its end arrives
        self._partial_size = 0
        self._passing_on = False

    def data_received(self, data: bytes) -> None:
        if self._passing_on:
            self._stream.data_received(data)  # type: ignore[attr-defined]
            return
        if b"\n" not in data:              # a large reply comes in pieces: joined once
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size > self._limit:
                self._passing_on = True
                self._flush()
            return
        if self._partial:
            data = b"".join([*self._partial, data])
            self._partial.clear()
            self._partial_size = 0
        lines = data.split(b"\n")
        if rest := lines.pop():
            self._partial.append(rest)
            self._partial_size = len(rest)
        for line in lines:
            if line.strip() and not self._routed(line):
                self._stream.data_received(line + b"\n")  # type: ignore[attr-defined]

    def _routed(self, line: bytes) -> bool:
        if len(line) > self._limit:
            return False
        try:
            msg = json.loads(line)
        except ValueError:
            return False
        return isinstance(msg, dict) and self._route(msg)

    def eof_received(self) -> bool | None:
        self._flush()
        return self._stream.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        self._stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()

    def _flush(self) -> None:
        """A message without its end goes to the library, which reads it as it would."""
        if self._partial:
            partial = b"".join(self._partial)
            self._partial.clear()
            self._partial_size = 0
            self._stream.data_received(partial)  # type: ignore[attr-defined]


def route_directly(writer: asyncio.StreamWriter, route: Route, limit: int) -> None:
    """Put a :class:`MessageRouter` between ``writer``'s socket and its stream protocol."""
    transport = writer.transport
    transport.set_protocol(MessageRouter(transport.get_protocol(), route, limit))
