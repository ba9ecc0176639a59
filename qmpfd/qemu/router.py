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
    library's ``StreamReaderProtocol``) gets the rest, and everything about the connection."""

    def __init__(self, stream: asyncio.BaseProtocol, route: Route) -> None:
        self._stream = stream
        self._route = route
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n") if self._partial else data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip() and not self._routed(line):
                self._stream.data_received(line + b"\n")  # type: ignore[attr-defined]

    def _routed(self, line: bytes) -> bool:
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
        """A last line without its end goes to the library, which reads it as it would."""
        if self._partial:
            partial, self._partial = self._partial, b""
            self._stream.data_received(partial)  # type: ignore[attr-defined]


def route_directly(writer: asyncio.StreamWriter, route: Route) -> None:
    """Put a :class:`MessageRouter` between ``writer``'s socket and its stream protocol."""
    transport = writer.transport
    transport.set_protocol(MessageRouter(transport.get_protocol(), route))
