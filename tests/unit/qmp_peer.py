"""A peer speaking QMP's wire protocol from a script, on a real Unix socket (the ``peer``
fixture of tests/unit/conftest.py): the greeting, replies, QEMU's error replies, silence,
events, and a socket that closes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}


class QmpPeer:
    """Answers each command from ``replies`` (name -> return value, or an ``error`` dict, or
    None for no answer at all); ``events`` are sent after qmp_capabilities."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replies: dict[str, Any] = {}
        #: messages (events) written with a command's reply, in the same write: before it
        #: (``before``) or after it (``after``)
        self.before: dict[str, list[dict[str, Any]]] = {}
        self.after: dict[str, list[dict[str, Any]]] = {}
        self.received: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.greet = True
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def send(self, msg: dict[str, Any]) -> None:
        for w in self.writers:
            w.write(json.dumps(msg).encode() + b"\r\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await self._answer(reader, writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        if not self.greet:
            await reader.read()
            return
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        async for msg in _messages(reader):
            cmd = msg["execute"]
            self.received.append(cmd)
            if cmd == "qmp_capabilities":
                answer: dict[str, Any] | None = {"return": {}}
            elif cmd not in self.replies:
                answer = {"error": {"class": "CommandNotFound",
                                    "desc": f"The command {cmd} has not been found"}}
            elif self.replies[cmd] is None:
                answer = None
            elif isinstance(self.replies[cmd], dict) and "error" in self.replies[cmd]:
                answer = dict(self.replies[cmd])
            else:
                answer = {"return": self.replies[cmd]}
            if answer is not None:
                if "id" in msg:
                    answer["id"] = msg["id"]
                batch = [*self.before.get(cmd, []), answer, *self.after.get(cmd, [])]
                writer.write(b"".join(json.dumps(m).encode() + b"\r\n" for m in batch))
            await writer.drain()


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """QMP is a stream of JSON objects with no separator required (qemu.qmp sends none)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(4096):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                msg, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break                                   # the rest is still on its way
            buffer = buffer.lstrip()[end:]
            yield msg
