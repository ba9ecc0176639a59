"""The executor's error paths against a scripted QEMU monitor (no QEMU: pure asyncio).

:class:`ScriptedQemu` keeps the devices a QEMU would hold and answers each command as scripted:
accept, refuse, answer too late (the command was carried out but the reply missed the timeout),
never carry out, or lose the connection. It emits DEVICE_DELETED the way the hotplug mechanism
does (ACPI ejects the whole slot; native PCIe removes a hidden function on its own). The tests
check what a client is told against what the scripted QEMU holds at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.executor import AttachFailed, execute_attach, execute_unplug
from qmpfd.hotplug.plan import FunctionSpec, Plan, plan_attach
from qmpfd.hotplug.policies import policy_for
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.topology import RawDevice
from tests.unit.scripted_qemu import (
    GONE,
    LATE,
    LOST,
    NO_EVENT,
    REFUSE,
    ScriptedQemu,
)
from tests.unit.topologies import pc_raw, q35_raw, topo


def setup(machine: str = "pc", n: int = 4) -> tuple[Plan, SlotTable, ScriptedQemu,
                                                     DeletionTracker]:
    raws = pc_raw() if machine == "pc" else q35_raw(native=True)
    table = SlotTable(topo(raws))
    policies = {b.name: policy_for("x86_64", "pc" if machine == "pc" else "q35", b.mechanism)
                for b in table.topology.buses}
    specs = [FunctionSpec(f"d{i}", "virtio-rng-pci", i) for i in range(n)]
    plan = plan_attach(table, specs, policies)
    plan = Plan(plan.bus, plan.slot, plan.policy.with_timeouts(0.05, 0.3), plan.functions,
                plan.steps)
    table.reserve((plan.bus, plan.slot), plan.ids)
    tracker = DeletionTracker()
    tracker.on_deleted.append(lambda dev, _asked: table.deleted(dev))
    qemu = ScriptedQemu(tracker, slot_wide_eject=machine == "pc")
    return plan, table, qemu, tracker


async def run(plan: Plan, table: SlotTable, qemu: ScriptedQemu,
              tracker: DeletionTracker) -> AttachFailed | None:
    try:
        await execute_attach(plan, qemu, tracker, table)  # type: ignore[arg-type]
    except AttachFailed as exc:
        await asyncio.sleep(0.05)           # let any DEVICE_DELETED still on its way land
        return exc
    return None


async def test_plug_is_pipelined_function_zero_last() -> None:
    plan, table, qemu, tracker = setup()
    assert await run(plan, table, qemu, tracker) is None
    adds = [i for c, i in qemu.sent if c == "device_add"]
    assert sorted(adds[:-1]) == ["d1", "d2", "d3"] and adds[-1] == "d0"
    assert len(qemu.sent) == 4                       # nothing read back
    assert set(qemu.devices) == {"d0", "d1", "d2", "d3"}
    assert {"d0", "d1", "d2", "d3"} <= table.topology.device_ids()


async def test_a_multifunction_plug_changes_the_slot_table_once() -> None:
    """Counted: the table (a new topology per change) learns every function of the slot in
    one change after the last reply, not one per batch of device_adds; when function 0 is
    refused the functions QEMU took are in the table before the rollback deletes them."""
    plan, table, qemu, tracker = setup()
    changes: list[list[str]] = []
    real = table.added

    def counted(key: tuple[str, int], devs: Iterable[RawDevice]) -> None:
        devs = list(devs)
        changes.append(sorted(str(d.id) for d in devs))
        real(key, devs)
    table.added = counted  # type: ignore[method-assign]
    assert await run(plan, table, qemu, tracker) is None
    assert changes == [["d0", "d1", "d2", "d3"]]
    plan, table, qemu, tracker = setup()
    seen: list[bool] = []
    qemu.script[("device_add", "d0")] = REFUSE
    real_del = qemu.device_del

    def device_del(args: dict[str, Any], action: str) -> dict[str, Any]:
        seen.append({"d1", "d2", "d3"} <= table.topology.device_ids())
        return real_del(args, action)
    qemu.device_del = device_del  # type: ignore[method-assign]
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and exc.rollback.left == [] and seen and all(seen)
    assert not {"d1", "d2", "d3"} & table.topology.device_ids()


@pytest.mark.parametrize("machine", ["pc", "q35-native"])
@pytest.mark.parametrize("refused", [0, 1, 2, 3])
async def test_refusal_at_each_position_is_rolled_back_completely(machine: str,
                                                                  refused: int) -> None:
    plan, table, qemu, tracker = setup(machine)
    qemu.script[("device_add", f"d{refused}")] = REFUSE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and exc.rollback.left == []
    assert f"function {refused} ('d{refused}'" in exc.desc and exc.desc.endswith("rolled back")
    assert qemu.devices == {}                        # QEMU holds nothing of the request
    assert not {"d0", "d1", "d2", "d3"} & table.topology.device_ids()
    if refused == 0 and machine == "pc":             # ACPI: one eject takes the hidden slot
        assert [c for c in qemu.sent if c[0] == "device_del"] == [("device_del", "d1")]


@pytest.mark.parametrize("machine", ["pc", "q35-native"])
@pytest.mark.parametrize("late", [0, 2])
async def test_device_add_applied_after_its_timeout_is_taken_back(machine: str,
                                                                  late: int) -> None:
    """The reply missed the timeout but QEMU did it: the reply must not say "rolled back"
    while QEMU holds it, and the id must be free again afterwards."""
    plan, table, qemu, tracker = setup(machine)
    qemu.script[("device_add", f"d{late}")] = LATE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and isinstance(exc.cause, Timeout)
    assert ("qom-get", f"d{late}") in qemu.sent      # probed, ordered after its device_add
    assert exc.rollback.left == [] and exc.desc.endswith("rolled back")
    assert qemu.devices == {}
    assert f"d{late}" not in table.topology.device_ids()


async def test_device_add_never_carried_out_is_not_deleted() -> None:
    plan, table, qemu, tracker = setup("q35-native")
    qemu.script[("device_add", "d2")] = LOST
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and exc.rollback.left == []
    assert ("device_del", "d2") not in qemu.sent
    assert qemu.devices == {} and "d2" not in table.topology.device_ids()


async def test_single_function_late_reply() -> None:
    plan, table, qemu, tracker = setup("pc", n=1)
    qemu.script[("device_add", "d0")] = LATE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and exc.rollback.left == [] and qemu.devices == {}
    assert ("device_del", "d0") in qemu.sent


async def test_device_del_refused_in_rollback_reports_what_is_left() -> None:
    plan, table, qemu, tracker = setup("q35-native")
    qemu.script[("device_add", "d0")] = REFUSE
    qemu.script[("device_del", "d2")] = REFUSE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None
    assert exc.rollback.left == ["d2"] and set(qemu.devices) == {"d2"}
    assert "rolled back" not in exc.desc.replace("rollback still waiting", "")
    assert "still waiting for the guest to release d2" in exc.desc


async def test_guest_that_never_releases_leaves_the_slot_unplugging() -> None:
    plan, table, qemu, tracker = setup("pc")
    qemu.script[("device_add", "d0")] = REFUSE
    qemu.script[("device_del", "d1")] = NO_EVENT
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and sorted(exc.rollback.left) == ["d1", "d2", "d3"]
    assert set(qemu.devices) == {"d1", "d2", "d3"}


async def test_vm_gone_mid_plug_reports_everything_possibly_added() -> None:
    plan, table, qemu, tracker = setup("pc")
    qemu.script[("device_add", "d0")] = GONE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and isinstance(exc.cause, VmGone)
    assert sorted(exc.rollback.left) == ["d1", "d2", "d3"]   # reconcile settles them later
    assert not [c for c in qemu.sent if c[0] == "device_del"]


async def test_vm_gone_mid_rollback() -> None:
    plan, table, qemu, tracker = setup("q35-native")
    qemu.script[("device_add", "d0")] = REFUSE
    qemu.script[("device_del", "d1")] = GONE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and sorted(exc.rollback.left) == ["d1", "d2", "d3"]
    assert "rolled back" not in exc.desc.replace("rollback still waiting", "")


async def test_vm_gone_while_probing_a_late_reply() -> None:
    plan, table, qemu, tracker = setup("pc")
    qemu.script[("device_add", "d0")] = LATE
    qemu.script[("qom-get", "d0")] = GONE
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and "d0" in exc.rollback.left
    assert "rolled back" not in exc.desc.replace("rollback still waiting", "")


async def test_unplug_waits_out_a_busy_guest_and_reports_the_wait() -> None:
    plan, table, qemu, tracker = setup("q35-native")
    assert await run(plan, table, qemu, tracker) is None
    qemu.script[("device_del", "d0")] = "busy:3"
    waits: list[str] = []
    loop = asyncio.get_running_loop()
    done = tracker.expect(plan.ids)
    await execute_unplug(["d0"], done, qemu, tracker,  # type: ignore[arg-type]
                         deadline=loop.time() + 5, on_wait=waits.append)
    await asyncio.wait_for(done, 2)
    assert len(waits) == 3 and "guest is busy" in waits[0]
    assert [c for c in qemu.sent if c[0] == "device_del"] == [("device_del", "d0")] * 4
    assert qemu.devices == {}


async def test_a_guest_busy_past_the_deadline_is_a_timeout_and_other_refusals_are_final(
        ) -> None:
    plan, table, qemu, tracker = setup("q35-native")
    assert await run(plan, table, qemu, tracker) is None
    loop = asyncio.get_running_loop()
    qemu.script[("device_del", "d0")] = "busy:1000"
    with pytest.raises(Timeout, match="still refused it when the request's time ran out"):
        await execute_unplug(["d0"], tracker.expect(plan.ids), qemu,  # type: ignore[arg-type]
                             tracker, deadline=loop.time() + 0.5)
    qemu.script[("device_del", "d0")] = REFUSE
    sent = len([c for c in qemu.sent if c[0] == "device_del"])
    with pytest.raises(QemuError):
        await execute_unplug(["d0"], tracker.expect(plan.ids), qemu,  # type: ignore[arg-type]
                             tracker, deadline=loop.time() + 5)
    assert len([c for c in qemu.sent if c[0] == "device_del"]) == sent + 1   # not retried


async def test_rollback_waits_out_a_busy_guest() -> None:
    plan, table, qemu, tracker = setup("q35-native")
    qemu.script[("device_add", "d0")] = REFUSE
    qemu.script[("device_del", "d1")] = "busy:1"
    exc = await run(plan, table, qemu, tracker)
    assert exc is not None and exc.rollback.left == [] and qemu.devices == {}
