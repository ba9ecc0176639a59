"""A logging QMP proxy: sits between a QMP client (qmpfd) and QEMU's QMP socket, passes bytes
unchanged, and records the name of every command the client sends. Tests and benchmarks use it
to count what qmpfd really sends, independently of qmpfd's own counters.

QMP messages are JSON objects back to back (qemu.qmp sends no newline), so the client's stream
is parsed with ``raw_decode``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path


class QmpProxy:
    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self.commands: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.listen.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_client, path=str(self.listen))

    def reset(self) -> list[str]:
        """The commands recorded so far; starts a new count."""
        seen, self.commands = self.commands, []
        return seen

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        t1 = asyncio.create_task(self._pump(reader, up_writer, record=True))
        t2 = asyncio.create_task(self._pump(up_reader, writer, record=False))
        self._tasks |= {t1, t2}
        await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        for t in (t1, t2):
            t.cancel()
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    record: bool) -> None:
        decoder = json.JSONDecoder()
        buf = ""
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
            if not record:
                continue
            buf += data.decode(errors="replace")
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    msg, end = decoder.raw_decode(buf)
                except ValueError:
                    break           # an incomplete message: wait for more bytes
                buf = buf[end:]
                if isinstance(msg, dict) and "execute" in msg:
                    self.commands.append(str(msg["execute"]))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.listen.unlink(missing_ok=True)
