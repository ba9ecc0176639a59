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
from qmpfd.api.session import Session, early_reply
from qmpfd.errors import NotFound, QmpfdError


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
    if name in ("early", "early-then-fails", "early-then-bug"):
        early = early_reply()
        assert early is not None
        early.prepare({"done": True})
        early.send()
        early.send()                        # once only
        await asyncio.sleep(0.01)           # the handler goes on after its reply left
        if name == "early-then-fails":
            raise QmpfdError("after the fact")
        if name == "early-then-bug":
            raise RuntimeError("a bug after the fact")
        return {"not": "sent"}
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


async def counted_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter],
                                  tuple[asyncio.StreamReader, asyncio.StreamWriter],
                                  list[bytes]]:
    """A connected pair of streams (the session's end, the client's end) and the list of every
    ``write`` the session's end makes."""
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    writes: list[bytes] = []
    real_write = sw.write

    def counting(data: bytes) -> None:
        writes.append(data)
        real_write(data)
    sw.write = counting  # type: ignore[method-assign]
    return (sr, sw), (cr, cw), writes


async def test_an_event_and_the_reply_after_it_are_one_write_in_order() -> None:
    """Output is gathered per loop iteration: the operation's event and its reply reach the
    socket in one ``write`` (counted), the event first; no task or queue per event."""
    (sr, sw), (cr, cw), writes = await counted_pair()

    async def emitting(name: str, args: dict[str, Any], s: Session) -> Any:
        s.offer_event({"event": "SLOT_ATTACHED", "data": {"vm": "v"}})
        return {}
    session = Session(sr, sw, emitting, Peer(pid=1, uid=0, gid=0), max_line=4096)
    tasks_before = len(asyncio.all_tasks())
    task = asyncio.create_task(session.run())
    c = Wire(cr, cw)
    await c.recv()
    await c.send({"execute": "qmp_capabilities"})
    await c.recv()
    assert len(asyncio.all_tasks()) == tasks_before + 1, "one task per session, none per event"
    writes.clear()
    await c.send({"execute": "attach", "id": 7})
    assert (await c.recv())["event"] == "SLOT_ATTACHED"
    assert (await c.recv())["id"] == 7
    assert len(writes) == 1 and writes[0].index(b"SLOT_ATTACHED") < writes[0].index(b'"id"')
    cw.close()
    await asyncio.wait_for(task, 5)


async def test_a_reply_is_written_before_the_loop_turns() -> None:
    """The reply leaves in the turn its request's handler returned in: a callback the handler
    scheduled (it runs at the next turn) already finds it written (one turn less between
    QEMU's answer and the client's)."""
    (sr, sw), (cr, cw), writes = await counted_pair()
    seen_at_next_turn: list[int] = []

    async def handler(name: str, args: dict[str, Any], s: Session) -> Any:
        writes.clear()
        asyncio.get_running_loop().call_soon(lambda: seen_at_next_turn.append(len(writes)))
        return {}
    session = Session(sr, sw, handler, Peer(pid=1, uid=0, gid=0), max_line=4096)
    task = asyncio.create_task(session.run())
    c = Wire(cr, cw)
    await c.recv()
    await c.send({"execute": "qmp_capabilities"})
    await c.recv()
    await c.send({"execute": "attach", "id": 3})
    assert (await c.recv())["id"] == 3
    assert seen_at_next_turn == [1]
    cw.close()
    await asyncio.wait_for(task, 5)


async def test_a_client_that_stops_reading_is_dropped_once_its_backlog_is_full(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import qmpfd.api.session as session_mod
    monkeypatch.setattr(session_mod, "OUTPUT_BACKLOG_LIMIT", 64 << 10)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sr, sw = await asyncio.open_connection(sock=a)
    session = Session(sr, sw, dispatch, Peer(pid=1, uid=0, gid=0), max_line=4096)
    task = asyncio.create_task(session.run())
    b.sendall(b'{"execute":"qmp_capabilities"}\n')
    for _ in range(500):                     # up to 5 s
        if session.negotiated:
            break
        await asyncio.sleep(0.01)
    assert session.negotiated
    big = {"event": "FUNCTION_QUEUED", "data": {"pad": "x" * 1000}}
    for _ in range(1000):                    # never read by the client: ~1 MB offered
        session.offer_event(big)
        await asyncio.sleep(0)
        if session.state.value == "closing":
            break
    assert session.state.value == "closing", "a client holding 1 MB of events was kept"
    await asyncio.wait_for(task, 5)
    b.close()


@pytest.mark.parametrize("name", ["early", "early-then-fails", "early-then-bug"])
async def test_a_reply_written_early_is_the_only_reply(pair: tuple[Session, Wire],
                                                       name: str) -> None:
    """A handler that answered early (EarlyReply) is not answered again: not with its return
    value, not with a failure it raises afterwards (QEMU carried the request out)."""
    _, c = pair
    await c.recv()
    await c.send({"execute": "qmp_capabilities"})
    await c.recv()
    await c.send({"execute": name, "id": 1})
    await c.send({"execute": "echo", "id": 2})
    assert await c.recv() == {"return": {"done": True}, "id": 1}
    assert await c.recv() == {"return": {}, "id": 2}
    assert early_reply() is None, "the request's EarlyReply does not outlive it"
