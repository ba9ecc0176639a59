"""One client session over a socket pair (no daemon): greeting, negotiation, replies in order,
errors by class, events after negotiation only, limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qmpfd.access.peer import Peer
from qmpfd.api.session import Session
from qmpfd.errors import NotFound


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, msg: Any) -> None:
        self.writer.write((json.dumps(msg) if not isinstance(msg, bytes) else msg.decode())
                          .encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        out: dict[str, Any] = json.loads(line)
        return out


async def dispatch(name: str, args: dict[str, Any], _s: Session) -> Any:
    if name == "echo":
        await asyncio.sleep(float(args.get("delay", 0)))
        return args
    if name == "boom":
        raise RuntimeError("a bug")
    raise NotFound(f"vm: no VM named '{args.get('vm')}'")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Session, Wire]]:
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    session = Session(sr, sw, dispatch, Peer(pid=1, uid=0, gid=0), max_line=4096)
    task = asyncio.create_task(session.run())
    client = Wire(cr, cw)
    yield session, client
    cw.close()
    await asyncio.wait_for(task, 5)


async def test_greeting_negotiation_and_replies_in_order(pair: tuple[Session, Wire]) -> None:
    session, c = pair
    greeting = await c.recv()
    assert "QMP" in greeting
    await c.send({"execute": "echo", "id": 1})
    refused = await c.recv()
    assert refused["error"]["class"] == "CommandNotFound" and refused["id"] == 1
    await c.send({"execute": "qmp_capabilities"})
    assert await c.recv() == {"return": {}}
    assert session.negotiated
    for i, delay in enumerate([0.2, 0.0]):        # the slow one first: replies stay in order
        await c.send({"execute": "echo", "arguments": {"delay": delay}, "id": i})
    assert [(await c.recv())["id"] for _ in range(2)] == [0, 1]


async def test_errors_by_class_and_a_bug_does_not_drop_the_client(
        pair: tuple[Session, Wire]) -> None:
    _, c = pair
    await c.recv()
    await c.send({"execute": "qmp_capabilities"})
    await c.recv()
    await c.send({"execute": "query-slots", "arguments": {"vm": "x"}})
    assert (await c.recv())["error"]["class"] == "NotFound"
    await c.send({"execute": "boom"})
    assert "internal error" in (await c.recv())["error"]["desc"]
    await c.send({"execute": "echo", "arguments": {"a": "x\u0000y"}})
    assert (await c.recv())["error"]["class"] == "InvalidRequest"
    await c.send(b'{"execute": "echo", "arguments": {"pad": "' + b"x" * 5000 + b'"}}')
    assert "limit" in (await c.recv())["error"]["desc"]
    await c.send({"execute": "echo", "arguments": {"still": "here"}})
    assert (await c.recv())["return"] == {"still": "here"}


async def test_events_only_after_negotiation(pair: tuple[Session, Wire]) -> None:
    session, c = pair
    await c.recv()
    session.offer_event({"event": "EARLY", "data": {}})       # not negotiated: dropped
    await c.send({"execute": "qmp_capabilities"})
    await c.recv()
    session.offer_event({"event": "SLOT_ATTACHED", "data": {"vm": "v"}})
    assert (await c.recv())["event"] == "SLOT_ATTACHED"
