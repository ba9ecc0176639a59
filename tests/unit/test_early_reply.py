"""An attach answered from the callback that read QEMU's acceptance of its last device_add.

Against a QMP peer on a real socket (the router's callback is where the answer goes out) and
the daemon's server in this process: the client's reply leaves before the slot's bookkeeping
and its SLOT_ATTACHED event, which still follow before the next request is read; an eject read
right after the reply is the slot's next change, not a failed attach; one read before it still
undoes the attach; a tenant's reply (its view of the value) is not written early.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qmpfd.access.peer import Peer
from qmpfd.api import session as session_mod
from qmpfd.api.session import EarlyReply
from qmpfd.errors import GuestEjected, QemuError
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.executor import AttachFailed, execute_attach
from qmpfd.hotplug.plan import Plan
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.link import QmpLink
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import Api, Served
from tests.unit.qmp_peer import QmpPeer
from tests.unit.replay import ReplayLink
from tests.unit.test_executor import setup
from tests.unit.test_tenancy_commands import TENANT_GID, policy


def deleted(dev: str) -> dict[str, Any]:
    return {"event": "DEVICE_DELETED", "data": {"device": dev, "path": f"/x/{dev}"},
            "timestamp": {"seconds": 1, "microseconds": 0}}


async def plugged_through(peer: QmpPeer, around: dict[str, list[dict[str, Any]]]
                          ) -> tuple[Plan, SlotTable, QmpLink, DeletionTracker]:
    """A 1-function plan and a real link to ``peer``, whose device_add reply comes with a
    DEVICE_DELETED of that function in the same write (``around``: ``peer.before`` or
    ``peer.after``)."""
    plan, table, _, tracker = setup(n=1)
    link = QmpLink("v", peer.path, command_timeout=5)
    link.subscribe(tracker.handle_event)
    await link.connect(5)
    peer.replies["device_add"] = {}
    around["device_add"] = [deleted("d0")]
    return plan, table, link, tracker


async def test_an_eject_read_right_after_the_last_reply_is_the_slots_next_change(
        peer: QmpPeer) -> None:
    """QEMU's acceptance and a DEVICE_DELETED in one read: ``on_plugged`` is told in the
    callback, before the slot table records the function (and before the event is routed);
    the attach succeeds, and the deletion then empties the slot it recorded."""
    plan, table, link, tracker = await plugged_through(peer, peer.after)
    told: list[bool] = []
    await execute_attach(plan, link, tracker, table,
                         on_plugged=lambda: told.append("d0" in table.topology.device_ids()))
    assert told == [False], "told once, before the table recorded the function"
    assert "d0" not in table.topology.device_ids(), "recorded, then deleted by the event"
    assert peer.received.count("device_add") == 1 and "device_del" not in peer.received
    await link.close()


async def test_an_eject_read_before_the_last_reply_still_undoes_the_attach(
        peer: QmpPeer) -> None:
    plan, table, link, tracker = await plugged_through(peer, peer.before)
    told: list[bool] = []
    with pytest.raises(AttachFailed) as failed:
        await execute_attach(plan, link, tracker, table, on_plugged=lambda: told.append(True))
    assert isinstance(failed.value.cause, GuestEjected) and told == []
    await link.close()


async def test_on_return_is_called_for_a_success_only_and_its_failure_is_not_the_commands(
        peer: QmpPeer) -> None:
    link = QmpLink("v", peer.path, command_timeout=5)
    await link.connect(5)
    calls: list[str] = []

    def boom() -> None:
        calls.append("called")
        raise RuntimeError("a bug in the callback")
    peer.replies["query-status"] = {"status": "running"}
    peer.replies["device_add"] = {"error": {"class": "GenericError", "desc": "refused"}}
    assert await link.execute("query-status", on_return=boom) == {"status": "running"}
    with pytest.raises(QemuError):
        await link.execute("device_add", {"id": "x"}, on_return=boom)
    assert calls == ["called"]
    await link.close()


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    async with Served(tmp_path) as s:
        yield s


class Wire:
    """A client reading qmpfd's socket as bytes: every message, in the order written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = ""
        self.seen: list[dict[str, Any]] = []

    async def request(self, n: int, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        self.writer.write(json.dumps({"execute": cmd, "arguments": args, "id": n}).encode())
        while True:
            for msg in self.seen:
                if msg.get("id") == n:
                    return msg
            await self._read()

    async def _read(self) -> None:
        chunk = await asyncio.wait_for(self.reader.read(65536), 10)
        assert chunk, "qmpfd closed the connection"
        self.buffer += chunk.decode()
        decoder = json.JSONDecoder()
        while self.buffer.strip():
            text = self.buffer.lstrip()
            try:
                msg, end = decoder.raw_decode(text)
            except ValueError:
                return
            self.seen.append(msg)
            self.buffer = text[end:]


async def test_the_reply_leaves_before_the_slots_event_and_the_next_request_sees_it(
        served: Served) -> None:
    """On the wire: the attach's reply, then its SLOT_ATTACHED (before this, the event came
    first, in the reply's write: the reply waited for the bookkeeping). A query sent right
    after the reply finds the slot attached."""
    reader, writer = await asyncio.open_unix_connection(str(served.sock))
    wire = Wire(reader, writer)
    await wire.request(0, "qmp_capabilities", {})
    await wire.request(1, "vm-add", {"name": "a", "qmp": served.qmp})
    placed = await wire.request(2, "device-attach", {"vm": "a", "functions": [
        {"id": "e0", "driver": "virtio-rng-pci"}]})
    assert placed["return"]["functions"] == [{"id": "e0", "function": 0}]
    slots = await wire.request(3, "query-slots", {"vm": "a"})
    mine = [s for s in slots["return"] if any(f.get("id") == "e0" for f in s["functions"])]
    assert [f["state"] for s in mine for f in s["functions"]] == ["present"]
    order = [m.get("id", m.get("event")) for m in wire.seen if m.get("id") == 2
             or m.get("event") == "SLOT_ATTACHED"]
    assert order == [2, "SLOT_ATTACHED"]
    writer.close()


class Recorder:
    """Where an EarlyReply writes: the bytes it would send."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def _write_now(self, data: bytes) -> None:
        self.written.append(data)


@pytest.mark.parametrize("tenant", [False, True])
async def test_a_tenants_attach_is_not_answered_early(tmp_path: Path, tenant: bool) -> None:
    """A tenant's reply is its view of the value, made after the handler returns: it goes the
    usual way. An administrator's is written once, from the plug's callback."""
    api = Api(tmp_path)
    api.commands.access = policy(tmp_path, tenants=True)
    if tenant:
        api.session.peer = Peer(pid=1, uid=5555, gid=TENANT_GID)
    sink = Recorder()
    early = EarlyReply(sink, {"execute": "device-attach", "id": 7})  # type: ignore[arg-type]
    token = session_mod._early_reply.set(early)
    try:
        value = await api.commands.dispatch("device-attach", {"vm": "v", "functions": [
            {"id": "t0", "driver": "virtio-rng-pci"}]}, api.session)
    finally:
        session_mod._early_reply.reset(token)
    assert early.sent is not tenant
    assert len(sink.written) == (0 if tenant else 1)
    if not tenant:
        assert json.loads(sink.written[0]) == {"return": value, "id": 7}
