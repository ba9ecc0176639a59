"""QmpLink over a real Unix socket, with a peer speaking QMP's wire protocol from a script:
the greeting, replies, QEMU's error replies, a silent QEMU, events, and a socket that closes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import Message

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.qemu.link import EventFanout, LinkState, QmpLink, nobody_listens
from tests.unit.qmp_peer import QmpPeer


async def test_commands_replies_errors_and_silence(peer: QmpPeer) -> None:
    link = QmpLink("v", peer.path, command_timeout=0.5)
    assert link.state is LinkState.NEW and not link.connected
    await link.connect(5)
    assert link.state is LinkState.UP
    peer.replies = {"query-status": {"status": "running"},
                    "device_del": {"error": {"class": "DeviceNotFound", "desc": "no 'x'"}},
                    "query-pci": None}
    assert await link.execute("query-status") == {"status": "running"}
    with pytest.raises(QemuError, match="DeviceNotFound") as refused:
        await link.execute("device_del", {"id": "x"})
    assert refused.value.qemu_class == "DeviceNotFound"
    with pytest.raises(Timeout, match=r"did not answer query-pci within 0\.2 s"):
        await link.execute("query-pci", timeout=0.2)
    assert link.commands_sent == 3
    await link.close()
    assert link.state is LinkState.CLOSED
    with pytest.raises(VmGone, match="not connected"):
        await link.execute("query-status")


async def test_events_reach_subscribers_and_a_closed_socket_is_noticed(peer: QmpPeer) -> None:
    link = QmpLink("v", peer.path, command_timeout=1)
    heard: list[dict[str, Any]] = []
    gone = asyncio.Event()
    link.subscribe(heard.append)
    link.on_disconnect = gone.set
    await link.connect(5)
    peer.send({"event": "DEVICE_DELETED", "data": {"device": "a", "path": "/x"},
               "timestamp": {"seconds": 1, "microseconds": 0}})
    for _ in range(100):
        if heard:
            break
        await asyncio.sleep(0.01)
    assert heard[0]["event"] == "DEVICE_DELETED" and heard[0]["data"]["device"] == "a"
    await peer.stop()                                   # QEMU went away
    await asyncio.wait_for(gone.wait(), 5)
    assert heard[-1]["event"] == "QMPFD_DISCONNECTED"
    assert link.state is LinkState.DOWN
    with pytest.raises(VmGone):
        await link.execute("query-status")
    await link.close()


async def test_connect_failures(tmp_path: Path) -> None:
    away = QmpLink("v", tmp_path / "none.sock", 1)
    with pytest.raises(VmGone, match="cannot connect to QMP socket"):
        await away.connect(1)
    assert away.state is LinkState.DOWN                 # query-health: down, not new
    silent = QmpPeer(tmp_path / "silent.sock")
    silent.greet = False
    await silent.start()
    try:
        mute = QmpLink("v", silent.path, 1)
        with pytest.raises(Timeout, match=r"no QMP greeting .* within 0\.3 s"):
            await mute.connect(0.3)
        assert mute.state is LinkState.DOWN
    finally:
        await silent.stop()


async def test_nobody_listens_only_when_nothing_can(tmp_path: Path, peer: QmpPeer) -> None:
    assert await nobody_listens(tmp_path / "none.sock", 1)
    assert not await nobody_listens(peer.path, 1)
    plain = tmp_path / "plain"
    plain.write_text("")
    assert await nobody_listens(plain, 1)                # a file nobody can listen on


def test_a_failing_subscriber_does_not_starve_the_others() -> None:
    fan = EventFanout("v")
    got: list[str] = []

    def broken(_ev: dict[str, Any]) -> None:
        raise RuntimeError("boom")
    fan.subscribe(broken)
    off = fan.subscribe(lambda ev: got.append(ev["event"]))
    fan.deliver({"event": "A"})
    off()
    off()                                                # twice: harmless
    fan.deliver({"event": "B"})
    assert got == ["A"]


async def test_a_command_is_written_before_the_loop_turns(peer: QmpPeer) -> None:
    """No hop through the library's writer task: once the command's first step has run, its
    bytes were handed to the socket (one turn less per command); replies still match their
    commands when several are in flight."""
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    client = link._client
    written: list[bytes] = []
    real = client._do_send

    def spy(msg: Any) -> None:
        written.append(bytes(msg))
        real(msg)
    client._do_send = spy  # type: ignore[method-assign]
    peer.replies = {"query-status": {"status": "running"}, "query-name": {"name": "v"}}
    first = asyncio.create_task(link.execute("query-status"))
    second = asyncio.create_task(link.execute("query-name"))
    await asyncio.sleep(0)              # both tasks take their first step, nothing more
    assert len(written) == 2
    assert b"query-status" in written[0] and b"query-name" in written[1]
    assert await second == {"name": "v"} and await first == {"status": "running"}
    await link.close()


async def test_a_command_is_made_into_json_once(peer: QmpPeer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: one serialisation per command sent (the library's execute made three: the
    message, its copy, and the copy with its id), and the bytes on the wire are what QEMU
    reads as the command with its id. QEMU's error reply and a reply with neither member
    still end as the library's errors do (QemuError, VmGone)."""
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    made: list[bytes] = []
    real = Message._serialize.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Message], value: object) -> bytes:
        made.append(real(cls, value))
        return made[-1]
    monkeypatch.setattr(Message, "_serialize", classmethod(counted))
    peer.replies = {"device_add": {}, "bad": {"error": "not an object"}}
    assert await link.execute("device_add", {"driver": "e1000", "id": "a"}) == {}
    assert len(made) == 1
    sent = json.loads(made[0])
    assert sent["execute"] == "device_add" and sent["arguments"] == {"driver": "e1000", "id": "a"}
    assert sent["id"].startswith("__qmp#")
    with pytest.raises(QemuError, match="CommandNotFound"):
        await link.execute("query-nothing")
    with pytest.raises(VmGone, match="malformed"):
        await link.execute("bad")
    await link.close()


async def test_a_batch_is_written_at_once_and_read_in_order_without_a_task_per_command(
        peer: QmpPeer) -> None:
    """Counted: every command of a batch is on the socket before the batch waits for the first
    reply, and no task is made for any of them (a gather made one per command). Each outcome
    sits in its command's place: a value, or QEMU's refusal as a QemuError, returned."""
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    written: list[bytes] = []
    real = link._client._do_send

    def spy(msg: Any) -> None:
        written.append(bytes(msg))
        real(msg)
    link._client._do_send = spy  # type: ignore[method-assign]
    peer.replies = {"device_add": {}, "query-name": {"name": "v"},
                    "device_del": {"error": {"class": "DeviceNotFound", "desc": "no 'x'"}}}
    loop = asyncio.get_running_loop()
    made: list[object] = []
    factory = loop.get_task_factory()
    loop.set_task_factory(lambda lp, coro, **kw: made.append(coro) or asyncio.Task(
        coro, loop=lp, **kw))
    try:
        batch = asyncio.create_task(link.execute_batch(
            [("device_add", {"id": "a"}), ("device_del", {"id": "x"}), ("query-name", {})]))
        await asyncio.sleep(0)           # the batch's first step: it now waits for a reply
        assert len(written) == 3, "all three written before any reply was awaited"
        assert [json.loads(w)["execute"] for w in written] == \
            ["device_add", "device_del", "query-name"]
        outcomes = await batch
    finally:
        loop.set_task_factory(factory)
    assert len(made) == 1, "no task per command (the one made is the batch's own)"
    assert outcomes[0] == {} and outcomes[2] == {"name": "v"}
    assert isinstance(outcomes[1], QemuError) and outcomes[1].qemu_class == "DeviceNotFound"
    assert link.commands_sent == 3
    await link.close()


async def test_a_batch_that_runs_out_of_time_or_loses_qemu_ends_each_command(
        peer: QmpPeer) -> None:
    """QEMU answers the first and goes silent: the first keeps its value, the rest end as
    Timeout and nothing stays waiting for them (a late reply is dropped). A closed socket ends
    the rest as VmGone. A device_del never goes in a batch through the unplug gate."""
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    peer.replies = {"query-name": {"name": "v"}, "query-pci": None}
    first, second, third = await link.execute_batch(
        [("query-name", {}), ("query-pci", {}), ("query-pci", {})], timeout=0.2)
    assert first == {"name": "v"}
    assert isinstance(second, Timeout) and isinstance(third, Timeout)
    assert "did not answer query-pci within 0.2 s" in second.desc
    assert not link._client._pending, "no reply is still awaited"
    peer.replies = {"query-pci": None}
    pending = asyncio.create_task(link.execute_batch([("query-pci", {}), ("query-pci", {})]))
    await asyncio.sleep(0.05)
    for w in peer.writers:
        w.close()
    outcomes = await asyncio.wait_for(pending, 5)
    assert [type(o) for o in outcomes] == [VmGone, VmGone]
    with pytest.raises(VmGone, match="not connected"):
        await link.execute_batch([("query-pci", {})])
    await link.close()


async def test_every_command_s_deadline_is_kept_by_one_timer(peer: QmpPeer) -> None:
    """Counted: twenty commands in flight arm the connection's one timer once (a timer per
    command cost more before the write than the rest of the link). A command with a shorter
    limit sets it earlier and ends as Timeout at its own limit while the others wait on; the
    timer is then set again for them. A reply that comes after its command's time ran out is
    dropped, and the link goes on."""
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    client = link._client
    peer.replies = {"query-pci": None, "query-name": {"name": "v"}}
    slow = [asyncio.create_task(link.execute("query-pci"))]
    await asyncio.sleep(0)
    timer = client._timer
    assert timer is not None
    slow += [asyncio.create_task(link.execute("query-pci")) for _ in range(19)]
    await asyncio.sleep(0)
    assert len(client._pending) == 20 and client._timer is timer, "armed once for twenty"
    short = asyncio.create_task(link.execute("query-pci", timeout=0.1))
    await asyncio.sleep(0)
    late_id = list(client._pending)[-1]
    assert client._timer is not None and client._timer.when() < timer.when()
    with pytest.raises(Timeout, match=r"did not answer query-pci within 0\.1 s"):
        await short
    assert len(client._pending) == 20 and not any(t.done() for t in slow)
    assert client._timer is not None and client._timer.when() >= timer.when() - 0.01, \
        "set again for the earliest deadline still pending"
    peer.send({"return": {}, "id": late_id})       # too late: nobody waits for it
    assert await link.execute("query-name") == {"name": "v"}
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    assert not client._pending
    await link.close()
