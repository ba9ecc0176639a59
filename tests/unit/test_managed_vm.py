"""One VM's operations end to end against the scripted QEMU (no socket, no guest): attach,
detach, queues, and the races several clients meet (an unasked eject, a slot emptied while its
detach is recorded, a monitor that stops answering mid-attach). The journal is real, in tmp_path.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpfd.errors import Conflict, GuestEjected, InvalidRequest, QmpfdError
from qmpfd.hotplug.executor import AttachFailed
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.policies.acpi_pcihp import ACPI_PCIHP
from qmpfd.hotplug.slots import SlotState, SlotTable
from qmpfd.qemu.introspect import VmIdentity
from qmpfd.qemu.topology import peripheral
from qmpfd.state.journal import Operation
from qmpfd.vm import follow as follow_mod
from qmpfd.vm import operations as operations_mod
from qmpfd.vm import removal
from qmpfd.vm.reconcile import reconcile
from tests.unit.harness import IDS, SPECS, Harness
from tests.unit.scripted_qemu import GONE, LOST, NO_EVENT
from tests.unit.topologies import pc_raw, q35_raw, topo


@pytest.fixture
async def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_attach_then_detach_ends_clean(h: Harness) -> None:
    result = await h.vm.attach(SPECS)
    key = (result.plan.bus, result.plan.slot)
    assert h.vm.table.state(key) is SlotState.PRESENT and set(h.qemu.devices) == set(IDS)
    assert [e["ids"] for e in h.named("SLOT_ATTACHED")] == [IDS]
    gone = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5)
    assert sorted(gone.ids) == sorted(IDS) and h.qemu.devices == {}
    await asyncio.sleep(0.05)
    assert h.vm.table.state(key) is SlotState.EMPTY and not h.journal.for_vm("v")
    assert h.named("SLOT_DETACHED") and not h.named("SLOT_EJECTED")
    assert [c for c in h.qemu.sent if c[0] == "device_del"] == [("device_del", "d0")]


async def test_an_unasked_eject_is_announced_released_and_the_slot_held_back(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow_mod, "EJECT_GATHER", 0.01)
    h.vm.bus_policies.overrides = {
        "acpi-pcihp": ACPI_PCIHP.with_timeouts(None, None, reuse_delay=2)}
    result = await h.vm.attach(SPECS)
    key = (result.plan.bus, result.plan.slot)
    h.eject(*IDS)
    await asyncio.sleep(0.1)
    assert h.vm.table.state(key) is SlotState.EMPTY
    assert [sorted(e["ids"]) for e in h.named("SLOT_EJECTED")] == [sorted(IDS)]  # one event
    assert h.released == [sorted(IDS)]
    assert h.vm.table.held_back(key, asyncio.get_running_loop().time()) > 0
    again = await h.vm.attach([FunctionSpec("n0", "virtio-rng-pci", 0)])
    assert (again.plan.bus, again.plan.slot) != key        # another slot while held back


async def test_an_eject_during_the_attach_undoes_it_and_says_so(h: Harness) -> None:
    real = h.qemu.device_add

    def add_then_eject(args: dict[str, Any], action: str) -> dict[str, Any]:
        out = real(args, action)
        if args["id"] == "d0":      # a stale eject of the slot, read before this reply
            h.eject(*IDS)
        return out
    h.qemu.device_add = add_then_eject  # type: ignore[method-assign]
    with pytest.raises(AttachFailed) as err:
        await h.vm.attach(SPECS)
    assert isinstance(err.value.cause, GuestEjected) and err.value.error_class == "Conflict"
    assert h.qemu.devices == {} and not h.journal.for_vm("v")
    assert not [c for c in h.qemu.sent if c[0] == "device_del"]   # nothing left to take back
    assert not h.vm.table.in_flight() and not h.vm.table.topology.device_ids() & set(IDS)


async def test_a_slot_emptied_while_its_detach_is_recorded(h: Harness) -> None:
    await h.vm.attach(SPECS)
    real_begin = h.journal.begin

    async def begin_while_ejected(op: Any) -> Any:
        h.eject(*IDS)                # the guest lets go while the record is written
        return await real_begin(op)
    h.journal.begin = begin_while_ejected  # type: ignore[method-assign]
    gone = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5)
    assert sorted(gone.ids) == sorted(IDS)
    await asyncio.sleep(0.05)
    assert not h.journal.for_vm("v") and not h.vm.table.in_flight()
    assert not [c for c in h.qemu.sent if c[0] == "device_del"]     # nothing left to ask
    assert not h.named("SLOT_EJECTED")                                 # it was asked for


async def test_a_monitor_that_stops_answering_mid_attach(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operations_mod, "UNKNOWN_RETRY", 0.01)
    h.qemu.script[("device_add", "d0")] = "late"          # carried out, answered too late
    h.qemu.script[("qom-get", "d0")] = LOST               # and the probe gets no answer
    with pytest.raises(AttachFailed) as err:
        await h.vm.attach(SPECS, timeout=0.05)
    assert err.value.error_class == "Timeout" and "not known yet" in err.value.desc
    assert [op.kind for op in h.journal.for_vm("v")] == ["attach"]     # still in flight
    assert not h.named("SLOT_ATTACH_FAILED")
    del h.qemu.script[("qom-get", "d0")]                  # QEMU answers again
    for _ in range(100):
        if h.named("SLOT_ATTACH_FAILED"):
            break
        await asyncio.sleep(0.02)
    assert h.named("SLOT_ATTACH_FAILED") and h.qemu.devices == {}
    assert not h.journal.for_vm("v") and not h.vm.table.in_flight()
    assert not h.vm.table.topology.device_ids() & set(IDS)


async def test_a_queue_completed_by_function_zero_and_one_cancelled(h: Harness) -> None:
    bus, slot = "pci.0", 5
    await h.vm.function_add(FunctionSpec("q1", "virtio-rng-pci", 1), bus, slot)
    assert h.vm.table.state((bus, slot)) is SlotState.QUEUED and "q1" not in h.qemu.devices
    await h.vm.function_add(FunctionSpec("q0", "virtio-rng-pci", 0), bus, slot)
    assert set(h.qemu.devices) == {"q0", "q1"}
    assert h.vm.table.state((bus, slot)) is SlotState.PRESENT
    await h.vm.function_add(FunctionSpec("r1", "virtio-rng-pci", 1), bus, 6)
    await h.vm.pending_cancel(bus, 6)
    assert h.vm.table.state((bus, 6)) is SlotState.EMPTY and h.named("PENDING_CANCELLED")
    with pytest.raises(Conflict):
        await h.vm.function_add(FunctionSpec("q2", "virtio-rng-pci", 2), bus, slot)


async def test_a_refused_detach_request_leaves_the_slot_present(h: Harness) -> None:
    result = await h.vm.attach(SPECS)
    key = (result.plan.bus, result.plan.slot)
    h.qemu.script[("device_del", "d0")] = "refuse"
    with pytest.raises(QmpfdError):
        await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5)
    assert h.vm.table.state(key) is SlotState.PRESENT and not h.journal.for_vm("v")


async def test_hotplug_commands_are_gated_only_on_acpi_buses(h: Harness) -> None:
    assert h.vm.bus_policies.gated("device_add", {"bus": "pci.0", "id": "x"})
    await h.vm.attach(SPECS)
    assert h.vm.bus_policies.gated("device_del", {"id": "d0"})
    assert not h.vm.bus_policies.gated("device_del", {"id": "nosuch"})
    directory = h.journal._log.path.parent / "native"
    directory.mkdir()
    native = Harness(directory)
    native.vm.table = SlotTable(topo(q35_raw(native=True)))
    native.vm.identity = VmIdentity("x86_64", "pc-q35-7.2", "7.2.0", (7, 2, 0))
    assert not native.vm.bus_policies.gated("device_add", {"bus": "rp1", "id": "x"})


async def test_settle_wakes_when_the_operation_ends(h: Harness) -> None:
    """vm-remove --force waits for the operation's end, not for a poll."""
    await h.vm.attach(SPECS)
    h.qemu.script[("device_del", "d0")] = NO_EVENT          # the guest has not let go yet
    reply = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5,
                              force=True)
    assert reply.unplugging
    flights = removal.in_flight(h.vm)
    assert [f.kind for f in flights] == ["detach"]
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, h.eject, *IDS)                      # now it does
    t0 = loop.time()
    settled = await removal.settle(h.vm, flights, limit=10)
    assert [s.outcome for s in settled] == ["detached"]
    assert loop.time() - t0 < removal.RECHECK                 # woken, not polled


def plugged(h: Harness, slot: int, *functions: int) -> None:
    """QEMU holds these functions of ``slot`` (what a crash mid-attach left)."""
    for fn in functions:
        h.qemu.devices[f"d{fn}"] = (f"0x{slot:x}", fn)
    h.vm.table.refresh(topo(pc_raw()).with_devices(
        "pci.0", [peripheral(f"d{fn}", "virtio-rng-pci", slot, fn) for fn in functions]))


@pytest.mark.parametrize(("kind", "present", "sent", "outcome"), [
    ("attach", (1, 2), False, "SLOT_ATTACH_FAILED"),     # half plugged: rolled back
    ("attach", (0, 1, 2, 3), False, "SLOT_ATTACHED"),    # it had finished: kept
    ("attach", (), False, "SLOT_ATTACH_FAILED"),         # nothing reached QEMU: forgotten
    ("detach", (0, 1, 2, 3), False, "SLOT_DETACHED"),    # never sent: sent now
    ("detach", (0, 1, 2, 3), True, "SLOT_DETACHED"),     # sent: waited for
    ("detach", (), True, "SLOT_DETACHED"),               # done while qmpfd was away
])
async def test_reconcile_finishes_or_undoes_what_the_journal_says(
        h: Harness, kind: str, present: tuple[int, ...], sent: bool, outcome: str) -> None:
    slot = 9
    plugged(h, slot, *present)
    op = Operation(kind, "v", "pci.0", slot, {f"d{i}": i for i in range(4)}, "acpi-pcihp")
    await h.journal.begin(op)
    if sent:
        h.journal.mark_sent(op)
        if present:     # the guest lets go a moment after qmpfd is back
            asyncio.get_running_loop().call_later(0.05, h.eject, *[f"d{i}" for i in present])
    await reconcile(h.vm)
    for _ in range(100):
        if not h.journal.for_vm("v") and h.named(outcome):
            break
        await asyncio.sleep(0.02)
    assert not h.journal.for_vm("v") and h.named(outcome), h.events
    if outcome != "SLOT_ATTACHED":
        assert h.qemu.devices == {} and not h.vm.table.topology.device_ids() & set(IDS)
    assert [e for e in h.events if e[0] != outcome and e[0] != "SLOT_EJECTED"] == []


async def test_a_link_lost_mid_attach_is_not_announced_as_failed(h: Harness) -> None:
    """QEMU may have carried the attach out: the outcome waits for the reconnect's reconcile
    (which says it with recovered: true), never a SLOT_ATTACH_FAILED now."""
    h.qemu.script[("device_add", "d0")] = GONE
    with pytest.raises(AttachFailed) as err:
        await h.vm.attach(SPECS)
    assert "not known yet" in err.value.desc and "connection lost" in err.value.desc
    assert not h.named("SLOT_ATTACH_FAILED")
    assert [op.kind for op in h.journal.for_vm("v")] == ["attach"]


async def test_properties_typed_once_per_driver_and_refused_by_name(h: Harness) -> None:
    spec = FunctionSpec("p0", "virtio-rng-pci", 0, {"max-bytes": "1024", "period": 0x10})
    (typed,) = await h.vm.typed([spec], {"p0": "functions[0]."})
    assert typed.properties == {"max-bytes": 1024, "period": 16}
    await h.vm.typed([spec], {"p0": "functions[0]."})
    asked = [c for c in h.qemu.sent if c[0] == "device-list-properties"]
    assert len(asked) == 1                                      # read once per driver
    with pytest.raises(InvalidRequest, match=r"functions\[0\]\.properties\.nosuch"):
        await h.vm.typed([FunctionSpec("p0", "virtio-rng-pci", 0, {"nosuch": 1})],
                         {"p0": "functions[0]."})
    with pytest.raises(InvalidRequest, match=r"functions\[1\]\.driver"):
        await h.vm.typed([FunctionSpec("p1", "no-such-device", 1, {"x": 1})],
                         {"p1": "functions[1]."})



async def test_an_attach_takes_the_allocation_lock_only_when_someone_holds_it(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: planning never awaits, so with the lock free an attach plans without taking
    it (five calls on the way to QEMU); while another holder has it (a stale view being read
    again), the attach waits for it and then gets a slot of its own."""
    taken: list[str] = []
    real = asyncio.Lock.acquire

    async def counted(self: asyncio.Lock) -> bool:
        taken.append("alloc" if self is h.vm.alloc else "other")
        return await real(self)
    monkeypatch.setattr(asyncio.Lock, "acquire", counted)
    await h.vm.attach([FunctionSpec("one", "virtio-rng-pci", 0)])
    assert "alloc" not in taken
    async with h.vm.alloc:
        second = asyncio.create_task(h.vm.attach([FunctionSpec("two", "virtio-rng-pci", 0)]))
        await asyncio.sleep(0.05)
        assert not second.done() and h.vm.table.find("two") is None, "it waits for the lock"
    await asyncio.wait_for(second, 5)
    assert taken.count("alloc") == 2 and h.vm.table.find("one") != h.vm.table.find("two")
