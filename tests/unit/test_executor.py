"""The executor's error paths against a scripted QEMU monitor (no QEMU: pure asyncio).

:class:`ScriptedQemu` keeps the devices a QEMU would hold and answers each command as scripted:
accept, refuse, answer too late (the command was carried out but the reply missed the timeout),
never carry out, or lose the connection. It emits DEVICE_DELETED the way the hotplug mechanism
does (ACPI ejects the whole slot; native PCIe removes a hidden function on its own). The tests
check what a client is told against what the scripted QEMU holds at the end.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.executor import AttachFailed, execute_attach, execute_unplug
from qmpfd.hotplug.plan import FunctionSpec, Plan, plan_attach
from qmpfd.hotplug.policies import policy_for
from qmpfd.hotplug.slots import SlotTable
from tests.unit.topologies import pc_raw, q35_raw, topo

# What a scripted command does, keyed by (command, device id).
ACCEPT, REFUSE, LATE, LOST, GONE, NO_EVENT = "accept", "refuse", "late", "lost", "gone", "no-event"


@dataclass
class ScriptedQemu:
    tracker: DeletionTracker
    slot_wide_eject: bool                         # ACPI: device_del ejects the whole slot
    script: dict[tuple[str, str], str] = field(default_factory=dict)
    devices: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (addr, function)
    sent: list[tuple[str, str]] = field(default_factory=list)
    connected: bool = True

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        args = args or {}
        dev_id = str(args.get("id") or str(args.get("path", "")).rsplit("/", 1)[-1])
        self.sent.append((cmd, dev_id))
        if not self.connected:
            raise VmGone("not connected")
        await asyncio.sleep(0)                    # replies come back on a later loop turn
        action = self.script.get((cmd, dev_id), ACCEPT)
        if action.startswith("busy:"):          # refused as busy this many more times
            left = int(action.split(":")[1])
            self.script[(cmd, dev_id)] = f"busy:{left - 1}" if left > 1 else ACCEPT
            raise QemuError("GenericError: Hot-unplug failed: guest is busy (power indicator "
                            "blinking)")
        if action == GONE:
            self.connected = False
            raise VmGone(f"QMP connection lost during {cmd}")
        if action == REFUSE:
            raise QemuError(f"GenericError: {cmd} {dev_id} refused (scripted)")
        if action == LOST:
            raise Timeout(f"QEMU did not answer {cmd} within {timeout} s")
        result = getattr(self, cmd.replace("-", "_"))(args, action)
        if action == LATE:
            raise Timeout(f"QEMU did not answer {cmd} within {timeout} s")
        return result

    def device_add(self, args: dict[str, Any], _: str) -> dict[str, Any]:
        addr = str(args["addr"])
        slot, _, fn = addr.partition(".")
        self.devices[str(args["id"])] = (slot, int(fn, 16) if fn else 0)
        return {}

    def device_del(self, args: dict[str, Any], action: str) -> dict[str, Any]:
        target = str(args["id"])
        if target not in self.devices:
            raise QemuError(f"DeviceNotFound: Device '{target}' not found")
        slot, fn = self.devices[target]
        gone = [i for i, (s, _) in self.devices.items() if s == slot] \
            if self.slot_wide_eject or fn == 0 else [target]
        if action != NO_EVENT:              # the guest releases them a moment later
            loop = asyncio.get_running_loop()
            for i in gone:
                loop.call_later(0.01, self._deleted, i)
        return {}

    def qom_get(self, args: dict[str, Any], _: str) -> str:
        dev_id = str(args["path"]).rsplit("/", 1)[-1]
        if dev_id not in self.devices:
            raise QemuError(f"DeviceNotFound: Device '{args['path']}' not found")
        return "virtio-rng-pci"

    def _deleted(self, dev_id: str) -> None:
        if self.devices.pop(dev_id, None) is not None:
            self.tracker.handle_event({"event": "DEVICE_DELETED",
                                       "data": {"device": dev_id, "path": "/x"}})


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
