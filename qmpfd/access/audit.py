"""The audit log: one JSON line per state-changing request, with the peer's uid and the outcome.

The file is opened once (0600, append-only) and kept open. :meth:`AuditLog.record` hands the
line to the log's own writer thread and returns: the thread writes lines in order, everything
queued since its last write in one ``write``, so a slow disk never blocks the event loop and
the reply to the request does not wait for it. Nothing comes back to the event loop per line
(no future, no wake-up): a request costs the loop one ``SimpleQueue.put``. (It was written
through ``aiofiles`` before; its round trip through the default executor and back was a fifth of
the daemon's CPU per attach.) The line describes a request already carried out, so a failure to
write it (a full or read-only disk) is logged loudly but never turns a request QEMU carried out
into an error reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmpfd.access.peer import Peer

log = logging.getLogger("qmpfd.access")


@dataclass
class _Line:
    data: bytes
    command: str
    outcome: str


@dataclass
class _Marker:
    """Answered once every line queued before it has been attempted; ``stop`` ends the thread."""
    stop: bool
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Line | _Marker] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd = -1               # owned by the writer thread
        self.failures = 0           # lines not written (counted by the writer thread)

    def record(self, peer: Peer, command: str, arguments: dict[str, Any],
               outcome: str) -> None:
        """Queue one line; written in order by the writer thread, never waited for."""
        line = json.dumps({
            "ts": round(time.time(), 3), "uid": peer.uid, "gid": peer.gid, "pid": peer.pid,
            "command": command, "arguments": arguments, "outcome": outcome,
        }, default=str, separators=(",", ":")) + "\n"
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        self._queue.put(_Line(line.encode(), command, outcome))

    def record_soon(self, peer: Peer, command: str, arguments: dict[str, Any],
                    outcome: str) -> None:
        """:meth:`record` at the next loop turn: after the reply to the request is written,
        not on its path (nobody waits for the line)."""
        asyncio.get_running_loop().call_soon(self.record, peer, command, arguments, outcome)

    async def drain(self) -> None:
        """Wait until every queued line has been attempted (shutdown, tests)."""
        await self._mark(stop=False)

    async def close(self) -> None:
        await self._mark(stop=True)
        self._thread = None

    async def _mark(self, stop: bool) -> None:
        if self._thread is None:
            return
        marker = _Marker(stop)
        self._queue.put(marker)
        await asyncio.wrap_future(marker.done)

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            lines: list[_Line] = []
            for item in batch:
                if isinstance(item, _Line):
                    lines.append(item)
                    continue
                self._write(lines)
                lines = []
                if item.stop:
                    self._close_file()
                item.done.set_result(None)
                if item.stop:
                    return
            self._write(lines)

    def _write(self, lines: list[_Line]) -> None:
        if not lines:
            return
        try:
            if self._fd < 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o600)
            data = memoryview(b"".join(x.data for x in lines))
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            self._close_file()     # reopened next time: the file may have been fixed or rotated
            self.failures += len(lines)
            for x in lines:
                log.error("audit log not written", extra={
                    "path": str(self.path), "command": x.command, "outcome": x.outcome,
                    "error": str(exc)})

    def _close_file(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
