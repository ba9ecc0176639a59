"""The typed client against the daemon's server in this process (VMs answered from recorded QEMU
replies): every typed method, the event stream resumed after a gap, the server's limits and
refusals, and a socket another process still serves left alone."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qmpfd.api.server import ApiServer, SocketBusy, inherited_socket
from qmpfd.client import Client, EventsLost, Unreachable
from qmpfd.client.errors import Conflict, NotFound
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import Served
from tests.unit.replay import ReplayLink

RNG = [{"id": f"r{i}", "driver": "virtio-rng-pci"} for i in range(2)]


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    async with Served(tmp_path) as s:
        yield s


async def test_every_typed_method(served: Served) -> None:
    async with await Client.open(served.sock) as c:
        await c.vm_add("a", served.qmp)
        assert [v.name for v in await c.query_vms()] == ["a"]
        assert (await c.query_policy("a"))["policy"] == "acpi-pcihp"
        dry = await c.device_attach("a", RNG, dry_run=True)
        placed = await c.device_attach("a", RNG, bus=dry.bus, slot=dry.slot)
        slots = await c.query_slots("a")
        mine = next(s for s in slots if (s.bus, s.slot) == (placed.bus, placed.slot))
        assert sorted(f.id for f in mine.functions if f.id) == ["r0", "r1"]
        with pytest.raises(Conflict):
            await c.device_attach("a", RNG)                   # the ids are taken
        gone = await c.device_detach("a", ["r0", "r1"])
        assert sorted(gone.ids) == ["r0", "r1"]
        assert await c.query_slots("a", refresh=True)
        queued = await c.function_add("a", "q1", "virtio-rng-pci", "pci.0", 9, 1)
        assert queued is not None
        assert [p.slot for p in await c.query_pending()] == [9]
        assert [p.slot for p in await c.query_pending("a")] == [9]
        assert (await c.pending_cancel("a", "pci.0", 9)).slot == 9
        assert await c.query_operations("a", ended=True) == []
        assert (await c.query_health()).status == "ok"
        assert await c.query_host_devices(multifunction_only=True) is not None
        with pytest.raises(Exception, match="passthrough is disabled"):
            await c.vm_qmp("a", "query-status")
        with pytest.raises(NotFound):
            await c.query_slots("nope")
        removed = await c.vm_remove("a")
        assert removed is not None


async def test_events_resume_after_a_gap_or_say_they_were_lost(served: Served) -> None:
    async with await Client.open(served.sock) as c:
        await c.vm_add("a", served.qmp)
        start = await c.query_events()
        await c.function_add("a", "q1", "virtio-rng-pci", "pci.0", 9, 1)
        await c.pending_cancel("a", "pci.0", 9)
        stream = c.events(after=(start.boot, start.seq))
        names = [(await anext(stream)).event for _ in range(2)]
        assert names == ["FUNCTION_QUEUED", "PENDING_CANCELLED"]
        with pytest.raises(EventsLost):
            await anext(c.events(after=("another-boot", 1)))


async def test_server_limits_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    async with Served(tmp_path) as s:
        s.daemon.server._max_clients = 1
        async with await Client.open(s.sock):
            with pytest.raises(Unreachable, match="refused the connection: too many clients"):
                await Client.open(s.sock)
            with pytest.raises(Unreachable, match="too many clients"):
                await Client.open(s.sock)                       # logged once, counted
        other = ApiServer(lambda *_: asyncio.sleep(0), max_clients=1, max_line=1024)
        with pytest.raises(SocketBusy, match="served by another process"):
            await other.listen(Path(s.sock), 0o600, None)
    with pytest.raises(Unreachable, match="cannot reach qmpfd"):
        await Client.open(str(tmp_path / "nothing.sock"))


async def test_a_socket_inherited_from_systemd(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert inherited_socket() is None
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert inherited_socket() is None and "LISTEN_FDS" not in os.environ
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen()
    saved = os.dup(3) if _fd_open(3) else None
    os.dup2(listener.fileno(), 3)
    try:
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        server = ApiServer(lambda *_: asyncio.sleep(0), max_clients=4, max_line=1024)
        await server.listen(tmp_path / "unused.sock", 0o600, None)
        r, w = await asyncio.open_unix_connection(str(tmp_path / "inherited.sock"))
        greeting = await asyncio.wait_for(r.readline(), 5)
        assert b'"QMP"' in greeting
        w.close()
        await server.close()
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)
        listener.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_tenant_sessions_are_limited_and_never_lock_out_full_access(
        tmp_path: Path) -> None:
    async def nothing(*_: object) -> None:
        return None
    server = ApiServer(nothing, max_clients=8, max_line=1024)  # type: ignore[arg-type]
    path = tmp_path / "api.sock"
    await server.listen(path, 0o600, None)
    limits = {"sessions": 3}
    server.tenant_of = lambda _peer: ("access.tenants[0]", limits["sessions"])

    async def session() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        r, w = await asyncio.open_unix_connection(str(path))
        return r, w, await asyncio.wait_for(r.readline(), 5)
    try:
        held = [await session() for _ in range(3)]
        assert all(b'"QMP"' in g for _, _, g in held)
        _, w, refused = await session()
        assert b"too many sessions for access.tenants[0] (its sessions = 3)" in refused
        w.close()
        limits["sessions"] = 100
        held += [await session() for _ in range(4)]             # 7 tenant sessions of 8
        _, w, refused = await session()
        assert b"kept for full-access peers" in refused
        w.close()
        server.tenant_of = lambda _peer: None                    # a full-access peer: room
        _, w, greeting = await session()
        assert b'"QMP"' in greeting
        w.close()
        for _, hw, _ in held:
            hw.close()
    finally:
        await server.close()


async def test_one_qemu_is_managed_once_whatever_monitor_reaches_it(served: Served,
                                                                    tmp_path: Path) -> None:
    """Two QMP sockets one process listens on (a QEMU's two monitors): the second vm-add is a
    Conflict naming the VM that has it; this is how one tenant took another's QEMU."""
    monitors = []
    for name in ("mon1.qmp", "mon2.qmp"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        s.listen(4)
        monitors.append(s)
    try:
        async with await Client.open(served.sock) as c:
            await c.vm_add("first", str(tmp_path / "mon1.qmp"))
            with pytest.raises(Conflict,
                               match=r"\(pid [0-9]+\) is already managed as VM 'first'"):
                await c.vm_add("second", str(tmp_path / "mon2.qmp"))
            assert [v.name for v in await c.query_vms()] == ["first"]
    finally:
        for s in monitors:
            s.close()


async def test_an_event_is_made_into_json_once_for_every_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: an event broadcast to several clients is encoded once (it was once per
    client), and every negotiated client reads the same event."""
    import json

    from qmpfd.api import wire
    async def nothing(*_: object) -> None:
        return None
    server = ApiServer(nothing, max_clients=8, max_line=1024)  # type: ignore[arg-type]
    path = tmp_path / "api.sock"
    await server.listen(path, 0o600, None)
    clients = []
    try:
        for _ in range(4):
            r, w = await asyncio.open_unix_connection(str(path))
            await asyncio.wait_for(r.readline(), 5)
            w.write(b'{"execute":"qmp_capabilities"}\n')
            await asyncio.wait_for(r.readline(), 5)
            clients.append((r, w))
        encodes: list[object] = []
        real = wire.encode
        monkeypatch.setattr(wire, "encode", lambda msg: encodes.append(msg) or real(msg))
        server.broadcast("SLOT_ATTACHED", {"vm": "v", "bus": "pci.0", "slot": 5})
        seen = [json.loads(await asyncio.wait_for(r.readline(), 5)) for r, _ in clients]
        assert len(encodes) == 1, "one encoding for four clients"
        assert all(e["event"] == "SLOT_ATTACHED" and e["data"]["slot"] == 5 for e in seen)
        for _, w in clients:
            w.close()
    finally:
        await server.close()
