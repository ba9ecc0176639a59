"""The audit log: one JSON line per state-changing request, with the peer's uid and the outcome.

The file is opened once (0600, append-only) and kept open. :meth:`AuditLog.record` queues the
line and returns: one writer task writes queued lines in order (through ``aiofiles``, in a
thread, so a slow disk never blocks the event loop), and the reply to the request does not wait
for it. The line describes a request already carried out, so a failure to write it (a full or
read-only disk) is logged loudly but never turns a request QEMU carried out into an error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiofiles
from aiofiles.threadpool.binary import AsyncFileIO

from qmpfd.access.peer import Peer

log = logging.getLogger("qmpfd.access")


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: AsyncFileIO | None = None
        self._queue: list[tuple[bytes, str, str]] = []
        self._writer: asyncio.Task[None] | None = None
        self.failures = 0

    async def _open(self) -> AsyncFileIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = await aiofiles.open(   # unbuffered: one write() per batch of lines
                self.path, "ab", buffering=0,
                opener=lambda p, flags: os.open(p, flags | os.O_CLOEXEC, 0o600))
        file: AsyncFileIO = self._file
        return file

    async def _write(self, data: bytes) -> None:
        f = await self._open()
        try:
            await f.write(data)
        except OSError:
            self._file = None       # reopened next time: the file may have been fixed or rotated
            with contextlib.suppress(OSError):
                await f.close()
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
                await self._write(b"".join(line for line, _, _ in batch))
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
        if self._file is not None:
            with contextlib.suppress(OSError):
                await self._file.close()
            self._file = None
