"""The audit log: one JSON line per state-changing request, with the peer's uid and the outcome.

The file is opened once (0600, append-only) and kept open. :meth:`AuditLog.record` queues the
line and returns: one writer task writes queued lines in order (in a thread, so a slow disk never
blocks the event loop), and the reply to the request does not wait for it. The line describes a
request already carried out, so a failure to write it (a full or read-only disk) is logged
loudly but never turns a request QEMU carried out into an error reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from qmpfd.access.peer import Peer

log = logging.getLogger("qmpfd.access")


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._queue: list[tuple[bytes, str, str]] = []
        self._writer: asyncio.Task[None] | None = None
        self.failures = 0

    def _open(self) -> int:
        if self._fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        return self._fd

    def _write(self, data: bytes) -> None:
        fd = self._open()
        try:
            os.write(fd, data)
        except OSError:
            os.close(fd)        # reopened next time: the file may have been fixed or rotated
            self._fd = -1
            raise

    def record(self, peer: Peer, command: str, arguments: dict[str, Any],
               outcome: str) -> None:
        """Queue one line; written in order by the writer task, never waited for."""
        line = json.dumps({
            "ts": round(time.time(), 3), "uid": peer.uid, "gid": peer.gid, "pid": peer.pid,
            "command": command, "arguments": arguments, "outcome": outcome,
        }, default=str, separators=(",", ":")) + "\n"
        self._queue.append((line.encode(), command, outcome))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

    async def _write_loop(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for line, _, _ in batch))
            except OSError as exc:
                self.failures += len(batch)
                for _, command, outcome in batch:
                    log.error("audit log not written", extra={
                        "path": str(self.path), "command": command, "outcome": outcome,
                        "error": str(exc)})

    async def drain(self) -> None:
        """Wait until every queued line has been attempted (shutdown, tests)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        await self.drain()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
