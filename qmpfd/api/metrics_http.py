"""The metrics listener: ``GET /metrics`` over a Unix socket or a loopback TCP address, nothing
else. Off unless ``[metrics] listen`` is set. Prometheus text format, or OpenMetrics when the
scraper asks for it (``Accept: application/openmetrics-text``).

A scrape is one small request and one answer; this serves exactly that on the daemon's event
loop (no thread, no extra dependency beyond prometheus_client's own exposition functions).
Connections are capped (:data:`MAX_CONNECTIONS` at once, each given :data:`READ_TIMEOUT` to
ask): connections held open cannot exhaust the daemon's file descriptors and starve its API.
On a Unix socket a peer is admitted by the API's own rules (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from qmpfd.access.peer import Peer
from qmpfd.api.server import peer_of
from qmpfd.metrics import REGISTRY

log = logging.getLogger("qmpfd.metrics")

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 16          # a scraper needs one; a few for humans with curl

Authorize = Callable[[Peer], str | None]


class Listener:
    """The connections of one metrics listener: counted, capped, and admitted."""

    def __init__(self, authorize: Authorize | None, unix: bool, limit: int) -> None:
        self._authorize = authorize if unix else None
        self._limit = limit
        self.open = 0

    async def __call__(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        refusal = None
        if self.open >= self._limit:
            refusal = "503 Service Unavailable", f"too many connections ({self._limit})\n"
        elif self._authorize is not None:
            reason = self._authorize(peer_of(writer.get_extra_info("socket")))
            if reason is not None:
                refusal = "403 Forbidden", reason + "\n"
        if refusal is not None:
            await _reply(writer, refusal[0], "text/plain", refusal[1].encode())
            return
        self.open += 1
        try:
            await _answer(reader, writer)
        finally:
            self.open -= 1


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
            ConnectionError):
        writer.close()
        return
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    path = rest.split(" ")[0]
    accept = next((ln.split(":", 1)[1] for ln in lines[1:] if ln.lower().startswith("accept:")),
                  "")
    if method != "GET" or path.split("?")[0] != "/metrics":
        status, ctype, body = "404 Not Found", "text/plain", b"only GET /metrics\n"
    elif "application/openmetrics-text" in accept:
        status, ctype = "200 OK", openmetrics.CONTENT_TYPE_LATEST
        body = openmetrics.generate_latest(REGISTRY)  # type: ignore[no-untyped-call]
    else:
        status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
    await _reply(writer, status, ctype, body)


async def _reply(writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes) -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                 "\r\nConnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def serve(listen: str, authorize: Authorize | None = None,
                max_connections: int = MAX_CONNECTIONS) -> asyncio.AbstractServer:
    """``unix:/path`` or ``HOST:PORT`` (HOST a loopback address; checked by the config).
    ``authorize``: the API's admission (a Unix socket's peers only: TCP has no credentials)."""
    unix = listen.startswith("unix:")
    handler = Listener(authorize, unix, max_connections)
    if unix:
        path = Path(listen[5:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(handler, path=str(path), limit=MAX_REQUEST)
        os.chmod(path, 0o660)
    else:
        host, _, port = listen.rpartition(":")
        server = await asyncio.start_server(handler, host.strip("[]"), int(port),
                                            limit=MAX_REQUEST)
    log.info("metrics listening", extra={"listen": listen})
    return server
