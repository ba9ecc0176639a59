"""The metrics listener: ``GET /metrics`` over a Unix socket or a loopback TCP address, nothing
else. Off unless ``[metrics] listen`` is set. Prometheus text format, or OpenMetrics when the
scraper asks for it (``Accept: application/openmetrics-text``).

A scrape is one small request and one answer; this serves exactly that on the daemon's event
loop (no thread, no extra dependency beyond prometheus_client's own exposition functions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from qmpfd.metrics import REGISTRY

log = logging.getLogger("qmpfd.metrics")

MAX_REQUEST = 8192
READ_TIMEOUT = 10.0


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
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                 "\r\nConnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def serve(listen: str) -> asyncio.AbstractServer:
    """``unix:/path`` or ``HOST:PORT`` (HOST a loopback address; checked by the config)."""
    if listen.startswith("unix:"):
        path = Path(listen[5:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(_answer, path=str(path), limit=MAX_REQUEST)
        os.chmod(path, 0o660)
    else:
        host, _, port = listen.rpartition(":")
        server = await asyncio.start_server(_answer, host.strip("[]"), int(port),
                                            limit=MAX_REQUEST)
    log.info("metrics listening", extra={"listen": listen})
    return server
