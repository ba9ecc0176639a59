"""The VM layer's less travelled paths, on the scripted QEMU: queues that are refused, restored,
overtaken or expire; attaches refused before or after QEMU was touched, or whose rollback must
wait for the guest; unplugs the guest refuses; vm-remove while an attach runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from qmpfd.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QmpfdError,
    Timeout,
    Unsupported,
    VmGone,
)
from qmpfd.hotplug.executor import AttachFailed
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.policies.acpi_pcihp import ACPI_PCIHP
from qmpfd.hotplug.slots import SlotState, SlotTable
from qmpfd.qemu.topology import peripheral
from qmpfd.vm import queues, removal
from qmpfd.vm.managed import ManagedVm
from qmpfd.vm.reconcile import reconcile
from tests.unit.harness import IDS, SPECS, Harness
from tests.unit.scripted_qemu import NO_EVENT, REFUSE

BUS, SLOT = "pci.0", 5


@pytest.fixture
async def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def rng(dev_id: str, function: int) -> FunctionSpec:
    return FunctionSpec(dev_id, "virtio-rng-pci", function)


async def until(condition: object, what: str) -> None:
    for _ in range(200):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


# -- queues ----------------------------------------------------------------------------------
async def test_a_queue_refuses_a_clash_and_a_bus_without_multifunction(h: Harness) -> None:
    await h.vm.function_add(rng("q1", 1), BUS, SLOT)
    with pytest.raises(Conflict, match="'q1' is already queued"):
        await h.vm.function_add(rng("q1", 2), BUS, SLOT)
    with pytest.raises(Conflict, match="id 'q1' is in use"):
        await h.vm.function_add(rng("q1", 1), BUS, SLOT + 1)
    h.vm.bus_policies.overrides = {"acpi-pcihp": dataclasses.replace(
        ACPI_PCIHP, multifunction=False, unsupported_reason="no multifunction here")}
    with pytest.raises(Unsupported, match="no multifunction here"):
        await h.vm.function_add(rng("n1", 1), BUS, SLOT + 2)
    assert h.vm.table.state((BUS, SLOT + 2)) is SlotState.EMPTY


async def test_a_flush_that_cannot_be_planned_keeps_the_queue(h: Harness) -> None:
    await h.vm.function_add(rng("q1", 1), BUS, SLOT)
    with pytest.raises(QmpfdError):
        await h.vm.function_add(FunctionSpec("q0", "virtio-rng-pci", 0,
                                             {"addr": "0x9"}), BUS, SLOT)   # a reserved property
    assert h.vm.table.state((BUS, SLOT)) is SlotState.QUEUED
    assert [f.id for q in h.vm.queued() for f in q.functions.values()] == ["q1"]
    assert h.qemu.devices == {}


async def test_queues_restored_from_the_journal_overtaken_or_expired(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await h.vm.function_add(rng("a1", 1), BUS, 7)      # its slot is taken while qmpfd is away
    await h.vm.function_add(rng("b1", 1), BUS, 8)      # its time runs out while it is away
    await h.vm.function_add(rng("c1", 1), BUS, 9)      # stays
    h.journal.pending["v"][f"{BUS}/8"]["expires"] = time.time() - 1
    # A restarted qmpfd: the VM made again from the journal, QEMU read again.
    restarted = ManagedVm("v", h.vm.qmp, lambda n, d: h.events.append((n, d)), h.journal,
                          command_timeout=1, connect_timeout=1, pending_ttl=60)
    restarted.identity = h.vm.identity
    assert {q.slot for q in restarted.queued()} == {7, 8, 9}
    assert restarted.table.state((BUS, 7)) is SlotState.QUEUED
    restarted.table.refresh(h.vm.table.topology.with_devices(BUS, [
        peripheral("other", "virtio-rng-pci", 7, 0)]))
    await queues.prune(restarted)
    assert {q.slot for q in restarted.queued()} == {8, 9}
    monkeypatch.setattr(asyncio, "sleep", _instant(asyncio.sleep))
    expiry = asyncio.create_task(queues.expire_loop(restarted))
    await until(lambda: {q.slot for q in restarted.queued()} == {9}, "slot 8 expired")
    expiry.cancel()
    assert [e["slot"] for e in h.named("PENDING_EXPIRED")] == [7, 8]
    assert set(h.journal.pending["v"]) == {f"{BUS}/9"}


def _instant(real: object) -> object:
    async def sleep(_seconds: float, *args: object) -> None:
        await real(0)  # type: ignore[operator]
    return sleep


# -- attach ----------------------------------------------------------------------------------
async def test_dry_run_and_a_record_that_cannot_be_written(h: Harness) -> None:
    plan = await h.vm.attach(SPECS, dry_run=True)
    assert plan.dry_run and not h.qemu.sent
    failing = RuntimeError("disk full")

    async def begin(_op: object) -> None:
        raise failing
    h.journal.begin = begin  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await h.vm.attach(SPECS)
    assert not h.vm.table.in_flight() and not h.qemu.sent


async def test_a_rollback_that_waits_for_the_guest(h: Harness) -> None:
    h.qemu.script[("device_add", "d0")] = REFUSE               # after functions 1-3 went in
    h.qemu.script[("device_del", "d1")] = NO_EVENT             # the guest is slow to let go
    h.qemu.slot_wide_eject = False
    h.vm.bus_policies.overrides = {"acpi-pcihp": ACPI_PCIHP.with_timeouts(None, 0.1)}
    with pytest.raises(AttachFailed) as err:
        await h.vm.attach(SPECS)
    assert err.value.rollback.left and "waiting for the guest" in err.value.desc
    assert [op.kind for op in h.journal.for_vm("v")] == ["attach"]
    key = (BUS, next(iter(h.vm.table.in_flight())).key[1])
    assert h.vm.table.state(key) is SlotState.UNPLUGGING
    h.eject(*err.value.rollback.left)                          # now it does
    await until(lambda: not h.journal.for_vm("v"), "rollback ended")
    assert h.vm.table.state(key) is SlotState.EMPTY
    assert h.named("SLOT_ATTACH_FAILED")


async def test_an_attach_planned_again_when_qemu_had_the_slot(h: Harness) -> None:
    """QEMU refused because the slot was taken behind qmpfd's back: read again, plan again."""
    calls = {"n": 0}
    real_refresh = h.vm.refresh

    async def refresh() -> None:
        calls["n"] += 1
        taken = peripheral("outsider", "virtio-rng-pci", SLOT, 0)
        h.vm.table.refresh(h.vm.table.topology.with_devices(BUS, [taken]))
    h.vm.refresh = refresh  # type: ignore[method-assign]
    h.qemu.script[("device_add", "d1")] = "refuse"
    attempt = asyncio.create_task(h.vm.attach(SPECS, bus=BUS, slot=SLOT))
    with pytest.raises(QmpfdError, match="slot"):
        await attempt                               # the named slot is taken: said clearly
    assert calls["n"] == 1 and h.qemu.devices == {} and not h.vm.table.in_flight()
    h.vm.refresh = real_refresh  # type: ignore[method-assign]


# -- unplug ----------------------------------------------------------------------------------
async def test_the_guest_refuses_an_unplug(h: Harness) -> None:
    result = await h.vm.attach(SPECS)
    key = (result.plan.bus, result.plan.slot)
    h.qemu.script[("device_del", "d0")] = NO_EVENT
    reply = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5,
                              force=True)
    assert reply.unplugging
    h.vm.tracker.handle_event({"event": "DEVICE_UNPLUG_GUEST_ERROR", "data": {"device": "d0"}})
    await until(lambda: not h.journal.for_vm("v"), "unplug ended")
    assert h.vm.table.state(key) is SlotState.PRESENT
    assert h.named("SLOT_DETACH_FAILED") and [e.kind for e in h.vm.failed] == ["detach"]


async def test_vm_remove_refused_while_an_attach_runs_and_forced_settles_it(
        h: Harness) -> None:
    gate = asyncio.Event()
    real = h.qemu.execute

    async def slow(cmd: str, args: dict[str, object] | None = None,
                   timeout: float | None = None, on_return: Any = None) -> object:
        if cmd == "device_add":
            await gate.wait()
        return await real(cmd, args, timeout, on_return)
    h.qemu.execute = slow  # type: ignore[method-assign]
    attach = asyncio.create_task(h.vm.attach(SPECS))
    # Journaled and waiting for QEMU (the slot is claimed a little before its record is
    # written: a flight seen in between names no operation yet).
    await until(lambda: any(f.operation for f in removal.in_flight(h.vm)), "attach journaled")
    flights = removal.in_flight(h.vm)
    refused = removal.refusal("v", flights)
    assert "attach operation" in refused.desc and "force: true" in refused.desc
    assert removal.settle_limit(h.vm) > 0
    asyncio.get_running_loop().call_later(0.05, gate.set)
    settled = await removal.settle(h.vm, flights, limit=10)
    await attach
    assert [s.outcome for s in settled] == ["completed"]


async def test_settle_gives_up_at_its_limit(h: Harness) -> None:
    await h.vm.attach(SPECS)
    h.qemu.script[("device_del", "d0")] = NO_EVENT
    await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5, force=True)
    settled = await removal.settle(h.vm, removal.in_flight(h.vm), limit=0.05)
    assert [(s.outcome, sorted(s.left)) for s in settled] == [("still-running", sorted(IDS))]


# -- detach: what is refused, naming the field -------------------------------------------------
async def test_detach_refusals_name_the_field_and_change_nothing(h: Harness) -> None:
    result = await h.vm.attach(SPECS)
    where = (result.plan.bus, result.plan.slot)
    await h.vm.function_add(rng("q1", 1), BUS, 20)

    async def detach(**kw: object) -> object:
        args: dict[str, object] = {"ids": None, "bus": None, "slot": None,
                                   "whole_slot": False, "timeout": 5}
        return await h.vm.detach(**{**args, **kw})  # type: ignore[arg-type]
    with pytest.raises(NotFound, match=r"ids\[0\]: no device 'nope'"):
        await detach(ids=["nope"])
    with pytest.raises(NotFound, match="it is queued: use pending-cancel"):
        await detach(ids=["q1"])
    with pytest.raises(InvalidRequest, match="ids: give the ids to detach, or bus and slot"):
        await detach()
    with pytest.raises(Conflict, match="ids: the slot also holds d1, d2, d3"):
        await detach(ids=["d0"])
    with pytest.raises(NotFound, match=r"slot: pci\.0 slot 21 is empty"):
        await detach(bus=BUS, slot=21)
    with pytest.raises(Unsupported, match="built-in devices"):
        await detach(bus=BUS, slot=1)                       # the PIIX, part of the machine
    h.qemu.script[("device_del", "d0")] = NO_EVENT
    await detach(bus=where[0], slot=where[1], force=True)
    with pytest.raises(Conflict, match="already unplugging"):
        await detach(ids=IDS)
    assert set(h.qemu.devices) == set(IDS)


async def test_a_busy_guest_is_waited_out_and_a_slow_one_times_out(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    await h.vm.attach(SPECS)
    h.qemu.script[("device_del", "d0")] = "busy:2"          # refused as busy twice, then taken
    gone = await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=10)
    assert gone.waited is not None and gone.waited > 0
    await h.vm.attach(SPECS)
    h.qemu.script[("device_del", "d0")] = NO_EVENT
    with pytest.raises(Timeout, match="stays 'unplugging'"):
        await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=0.1)


async def test_a_detach_whose_record_cannot_be_written(h: Harness) -> None:
    result = await h.vm.attach(SPECS)

    async def begin(_op: object) -> None:
        raise OSError("disk full")
    h.journal.begin = begin  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await h.vm.detach(ids=IDS, bus=None, slot=None, whole_slot=False, timeout=5)
    assert h.vm.table.state((result.plan.bus, result.plan.slot)) is SlotState.PRESENT
    assert not [c for c in h.qemu.sent if c[0] == "device_del"]


async def test_every_event_of_recovery_says_recovered(h: Harness) -> None:
    """An unplug found in flight after a restart that the guest then refuses, and one whose
    devices a restarted QEMU has from its command line: both failures are recovery's."""
    from qmpfd.state.journal import Operation

    result = await h.vm.attach(SPECS)
    bus, slot = result.plan.bus, result.plan.slot
    op = Operation("detach", "v", bus, slot, {f"d{i}": i for i in range(4)}, "acpi-pcihp")
    await h.journal.begin(op)
    h.journal.mark_sent(op)                                  # sent before the restart
    await reconcile(h.vm)                                    # still present: waited for again
    h.vm.tracker.handle_event({"event": "DEVICE_UNPLUG_GUEST_ERROR", "data": {"device": "d0"}})
    await until(lambda: h.named("SLOT_DETACH_FAILED"), "refusal announced")
    assert h.named("SLOT_DETACH_FAILED")[-1].get("recovered") is True
    op2 = Operation("detach", "v", bus, slot, {f"d{i}": i for i in range(4)}, "acpi-pcihp")
    await h.journal.begin(op2)
    h.qemu.hotplugged = False                                # QEMU's command line has them
    await reconcile(h.vm)
    assert h.named("SLOT_DETACH_FAILED")[-1].get("recovered") is True
    assert "command line" in h.named("SLOT_DETACH_FAILED")[-1]["reason"]


async def test_an_attach_whose_slot_recovery_took_over_is_not_a_conflict(h: Harness) -> None:
    """The link is lost while an attach waits for QEMU; the reconnect's recovery takes the slot
    over before the attach hears back. The attach says its outcome is not known yet (recovery
    announces it), not 'Conflict: slot ... is unplugging'."""
    gate = asyncio.Event()
    real = h.qemu.execute

    async def held(cmd: str, args: dict[str, object] | None = None,
                   timeout: float | None = None, on_return: Any = None) -> object:
        if cmd == "device_add" and args and args.get("id") == "d0":
            await gate.wait()
            raise VmGone("QMP connection lost during device_add")
        return await real(cmd, args, timeout, on_return)
    h.qemu.execute = held  # type: ignore[method-assign]
    attach = asyncio.create_task(h.vm.attach(SPECS))
    await until(lambda: h.vm.table.in_flight(), "attach in flight")
    (work,) = h.vm.table.in_flight()
    h.vm.table.wait_unplug(work.key, IDS[1:], "recovery")       # what reconcile does
    gate.set()
    with pytest.raises(AttachFailed) as err:
        await attach
    assert isinstance(err.value.cause, VmGone) and "not known yet" in err.value.desc
    assert h.vm.table.state(work.key) is SlotState.UNPLUGGING    # still recovery's


def test_a_buss_policy_is_decided_once_per_mechanism(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: every attach asks for the policy of every bus; each mechanism's is decided once
    (not a policy object per bus per request), and decided again when what it depends on
    changes: the VM's identity (a reconnect reads it again) or the configured overrides."""
    from types import SimpleNamespace

    from qmpfd.qemu.introspect import VmIdentity
    from qmpfd.vm import buspolicy
    from tests.unit.topologies import pc_raw, topo

    decided: list[str | None] = []
    real = buspolicy.policy_for

    def counted(*args: Any) -> Any:
        decided.append(args[2])
        return real(*args)
    monkeypatch.setattr(buspolicy, "policy_for", counted)
    table = SlotTable(topo(pc_raw()))
    owner = SimpleNamespace(identity=VmIdentity("x86_64", "pc-i440fx-7.2", "7.2.0", (7, 2, 0)),
                            table=table)
    policies = buspolicy.BusPolicies(owner, None)
    first = policies.all()
    for _ in range(5):
        assert policies.all() == first
        assert policies.of("pci.0") is first["pci.0"]
    mechanisms = {b.mechanism for b in table.topology.buses}
    assert len(decided) == len(mechanisms)
    owner.identity = VmIdentity("x86_64", "pc-i440fx-7.2", "7.2.0", (7, 2, 0))
    policies.all()
    assert len(decided) == 2 * len(mechanisms)
    policies.overrides = {}
    policies.all()
    assert len(decided) == 3 * len(mechanisms)
