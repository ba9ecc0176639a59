"""MessageRouter: QEMU's messages routed in the socket's callback; what it cannot route, and
everything about the connection, passed on to the library's stream unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qmpfd.errors import VmGone
from qmpfd.qemu.direct import ReplySlot
from qmpfd.qemu.link import QmpLink
from qmpfd.qemu.router import MessageRouter
from tests.unit.qmp_peer import QmpPeer


class Stream(asyncio.Protocol):
    """What the library's StreamReaderProtocol would get."""

    def __init__(self) -> None:
        self.data = b""
        self.calls: list[str] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(f"lost {exc}")

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


def test_whole_lines_are_routed_split_ones_wait_and_the_rest_goes_to_the_library() -> None:
    routed: list[dict[str, Any]] = []
    stream = Stream()
    router = MessageRouter(stream, lambda m: routed.append(m) or m.get("id") != "unknown",
                           limit=1000)
    router.data_received(b'{"return": {}, "id": "a"}\r\n{"event": "X", "da')
    assert routed == [{"return": {}, "id": "a"}] and stream.data == b""
    router.data_received(b'ta": {}}\r\n\r\n{"return": 1, "id": "unknown"}\r\nnot json\r\n[1]\r\n')
    assert routed[1] == {"event": "X", "data": {}} and len(routed) == 3
    assert stream.data == b'{"return": 1, "id": "unknown"}\r\nnot json\r\n[1]\r\n'
    router.data_received(b'{"return": {}, "i')           # cut off by the end of the stream
    router.pause_writing()
    router.resume_writing()
    assert router.eof_received() is False
    router.connection_lost(None)
    assert stream.data.endswith(b'[1]\r\n{"return": {}, "i')
    assert stream.calls == ["pause", "resume", "eof", "lost None"]


def test_a_message_over_the_limit_and_all_after_it_are_the_library_s() -> None:
    """The library refuses a message longer than its read limit and ends the session: the
    router leaves that to it, and a large message within the limit is joined once."""
    routed: list[dict[str, Any]] = []
    stream = Stream()
    router = MessageRouter(stream, lambda m: routed.append(m) or True, limit=100)
    big = b'{"return": "' + b"x" * 70 + b'", "id": "a"}'
    for piece in (big[:30], big[30:60], big[60:]):
        router.data_received(piece)
    router.data_received(b"\r\n")
    assert routed == [{"return": "x" * 70, "id": "a"}] and stream.data == b""
    router.data_received(b'{"return": "' + b"y" * 60)
    router.data_received(b"y" * 60)                      # over the limit, no end yet
    router.data_received(b'", "id": "b"}\r\n{"return": {}, "id": "c"}\r\n')
    assert len(routed) == 1
    assert stream.data == b'{"return": "' + b"y" * 120 + b'", "id": "b"}\r\n' \
        b'{"return": {}, "id": "c"}\r\n'


async def test_replies_and_events_skip_the_library_reader_and_its_listeners(
        peer: QmpPeer) -> None:
    """Counted: once the session runs, no reply or event goes through the library's reader
    task (its ``_on_message``), and no event is kept by its default listener, which nobody
    reads (before, every event of the connection's life stayed there). Events still reach
    subscribers in QEMU's order, and a lost socket still ends the session."""
    link = QmpLink("v", peer.path, command_timeout=5)
    heard: list[str] = []
    link.subscribe(lambda ev: heard.append(ev["data"]["device"]))
    await link.connect(5)
    client = link._client
    through_library: list[object] = []
    real = client._on_message

    async def spy(msg: Any) -> None:
        through_library.append(msg)
        await real(msg)
    client._on_message = spy  # type: ignore[method-assign]
    peer.replies = {"query-status": {"status": "running"}}
    waiting = asyncio.create_task(link.execute("query-status"))
    await asyncio.sleep(0)
    assert [type(w) for w in client._pending.values()] == [ReplySlot], \
        "a future per command, not an asyncio.Queue"
    assert await waiting == {"status": "running"}
    for n in range(3):
        peer.send({"event": "DEVICE_DELETED", "data": {"device": f"d{n}", "path": "/x"},
                   "timestamp": {"seconds": 1, "microseconds": 0}})
    assert await link.execute("query-status") == {"status": "running"}
    assert heard == ["d0", "d1", "d2"]
    assert through_library == [] and client.events.empty()
    peer.send({"return": {}, "id": "nobody-waits"})      # the library's: dropped with a warning
    assert await link.execute("query-status") == {"status": "running"}
    for _ in range(100):
        if through_library:
            break
        await asyncio.sleep(0.01)
    assert len(through_library) == 1 and link.connected
    await peer.stop()
    for _ in range(300):
        if not link.connected:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(VmGone):
        await link.execute("query-status")
    await link.close()
