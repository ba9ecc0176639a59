"""The ACPI unplug gate (qmpfd.qemu.gate), with no QEMU: who waits for whom, and every wait ends."""

import asyncio
from typing import Any

import pytest

from qmpfd.qemu import gate as gate_mod
from qmpfd.qemu.gate import UnplugGate

ALL = lambda cmd, args: not str(args.get("id", "")).startswith("native")  # noqa: E731


class Recorder:
    def __init__(self) -> None:
        self.log: list[str] = []

    def send(self, what: str, delay: float = 0.0) -> Any:
        async def go() -> str:
            self.log.append(f"start {what}")
            await asyncio.sleep(delay)
            self.log.append(f"end {what}")
            return what
        return go


def deleted(dev: str) -> dict[str, Any]:
    return {"event": "DEVICE_DELETED", "data": {"device": dev}}


async def test_an_unplug_waits_for_plugs_in_flight_and_holds_until_deleted() -> None:
    g = UnplugGate(ALL, hold_limit=10, quiet=0.05)
    r = Recorder()
    plug = asyncio.create_task(g.execute("device_add", {"id": "a"}, r.send("add a", 0.1)))
    await asyncio.sleep(0.01)
    unplug = asyncio.create_task(g.execute("device_del", {"id": "b"}, r.send("del b")))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(g.execute("device_add", {"id": "c"}, r.send("add c")))
    await asyncio.wait_for(unplug, 2)
    assert r.log == ["start add a", "end add a", "start del b", "end del b"]   # c waited
    await asyncio.sleep(0.1)
    assert not late.done() and g.holder == "b"        # held until the eject
    g.handle_event(deleted("b"))
    await asyncio.wait_for(late, 2)
    assert r.log[-2:] == ["start add c", "end add c"] and g.holder is None
    await asyncio.wait_for(plug, 1)


async def test_the_gate_frees_itself_when_the_guest_never_answers() -> None:
    g = UnplugGate(ALL, hold_limit=0.2, quiet=0)
    r = Recorder()
    await g.execute("device_del", {"id": "b"}, r.send("del b"))
    assert g.holder == "b"
    await asyncio.wait_for(g.execute("device_add", {"id": "c"}, r.send("add c")), 2)
    assert g.holder is None


async def test_a_lost_connection_or_a_refused_unplug_frees_it() -> None:
    g = UnplugGate(ALL, hold_limit=10, quiet=0)
    r = Recorder()
    await g.execute("device_del", {"id": "b"}, r.send("del b"))
    g.handle_event({"event": "QMPFD_DISCONNECTED", "data": {}})
    await asyncio.sleep(0.01)
    assert g.holder is None

    async def refused() -> None:
        raise RuntimeError("refused")
    with pytest.raises(RuntimeError):
        await g.execute("device_del", {"id": "x"}, refused)
    assert g.holder is None


async def test_other_commands_and_other_mechanisms_pass_straight_through() -> None:
    g = UnplugGate(ALL, hold_limit=10, quiet=0)
    r = Recorder()
    await g.execute("device_del", {"id": "b"}, r.send("del b"))
    await asyncio.wait_for(g.execute("qom-get", {"path": "x"}, r.send("qom")), 1)
    await asyncio.wait_for(g.execute("device_add", {"id": "native1"}, r.send("native")), 1)
    assert g.holder == "b"


async def test_an_unplug_waits_for_the_controller_to_be_quiet() -> None:
    g = UnplugGate(ALL, hold_limit=10, quiet=0.2)
    r = Recorder()
    await g.execute("device_add", {"id": "a"}, r.send("add a"))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await g.execute("device_del", {"id": "a"}, r.send("del a"))
    assert loop.time() - t0 >= 0.15


async def test_waiting_for_the_gate_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_mod, "WAIT_LIMIT", 0.1)
    g = UnplugGate(ALL, hold_limit=10, quiet=0)
    r = Recorder()
    await g.execute("device_del", {"id": "b"}, r.send("del b"))
    with pytest.raises(gate_mod.Timeout, match="still holds it"):
        await g.execute("device_add", {"id": "c"}, r.send("add c"))


async def test_a_batch_of_device_adds_counts_as_that_many_plugs() -> None:
    """An unplug waits until the whole batch is answered; a device_del is never batched."""
    g = UnplugGate(ALL, hold_limit=10, quiet=0)
    r = Recorder()
    batch = asyncio.create_task(g.execute_batch(
        [("device_add", {"id": "a1"}), ("device_add", {"id": "a2"})],
        r.send("add a1 a2", 0.1)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    unplug = asyncio.create_task(g.execute("device_del", {"id": "b"}, r.send("del b")))
    await asyncio.wait_for(unplug, 2)
    assert r.log == ["start add a1 a2", "end add a1 a2", "start del b", "end del b"]
    assert await batch == "add a1 a2"
    passed = await g.execute_batch([("device_add", {"id": "native1"})], r.send("other"))  # type: ignore[arg-type]
    assert passed == "other", "a batch on another mechanism's bus passes straight through"
    with pytest.raises(ValueError, match="device_del is sent alone"):
        await g.execute_batch([("device_add", {"id": "c"}), ("device_del", {"id": "b"})],
                              r.send("never"))  # type: ignore[arg-type]
    assert "start never" not in r.log


async def test_a_plug_with_nothing_to_wait_for_takes_no_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: with no unplug holding or waiting, a device_add is sent without the gate's
    lock (each acquire is a coroutine on the way to QEMU); an unplug that starts waiting
    meanwhile is still woken when the plug ends."""
    taken: list[str] = []
    real = asyncio.Lock.acquire

    async def counted(self: asyncio.Lock) -> bool:
        taken.append("lock")
        return await real(self)
    monkeypatch.setattr(asyncio.Lock, "acquire", counted)
    g = UnplugGate(ALL, hold_limit=10, quiet=0)     # its lock made after the patch
    r = Recorder()
    assert await g.execute("device_add", {"id": "a"}, r.send("add a")) == "add a"
    assert taken == []
    plug = asyncio.create_task(g.execute("device_add", {"id": "b"}, r.send("add b", 0.05)))
    await asyncio.sleep(0.01)
    unplug = asyncio.create_task(g.execute("device_del", {"id": "b"}, r.send("del b")))
    await asyncio.wait_for(asyncio.gather(plug, unplug), 2)
    assert r.log.index("end add b") < r.log.index("start del b")
    assert taken, "the unplug waited under the lock and was woken"
