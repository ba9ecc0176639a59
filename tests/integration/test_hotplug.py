"""Multifunction hotplug and unplug on x86 (pc, q35, q35 native PCIe) and aarch64 (virt) guests,
proven by what the guest itself sees.

Each machine kind boots one real Linux guest (module scope); qmpfd adopts it; tests attach and
detach through qmpfd's socket and then read the guest's own /sys/bus/pci/devices report from its
serial console, and QEMU's own view from a second QMP monitor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec, slot_groups
from tests.integration.conftest import (
    Client,
    adopt,
    connect,
    qemu_execute,
    qemu_view,
    refused_by_qemu,
    start_lab_vm,
)
from tests.integration.faults_support import MATRIX, MatrixRow

pytestmark = pytest.mark.integration

EXPECTED_POLICY = {"pc": "acpi-pcihp", "q35": "acpi-pcihp", "q35-native": "pcie-native",
                   "virt": "pcie-native"}
EXPECTED_ARCH = {"virt": "aarch64"}
DRIVERS = ["e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci",
           "e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci"]


@dataclass
class Guest:
    name: str
    machine: str
    lab: LabVm
    info: dict[str, Any]


@pytest.fixture(scope="module", params=["pc", "q35", "q35-native", "virt"])
def guest(request: pytest.FixtureRequest, workdir: Path, daemon: Path) -> Iterator[Guest]:
    machine = request.param
    name = f"hp-{machine}"
    lab = start_lab_vm(workdir, name, LabVmSpec(machine=machine, root_ports=4))
    try:
        yield Guest(name, machine, lab, adopt(daemon, name, lab.qmp_socket))
    finally:
        lab.stop()


def functions(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}f{i}", "driver": DRIVERS[i]} for i in range(n)]


def new_slots(before: set[str], after: set[str]) -> dict[str, set[int]]:
    return slot_groups(after - before)


async def attach_and_see(client: Client, g: Guest, prefix: str, n: int,
                         **extra: Any) -> tuple[dict[str, Any], set[str]]:
    """Attach n functions; wait until the guest shows n new functions; return (reply, before)."""
    before = g.lab.guest_pci() or set()
    reply = await client.execute("device-attach",
                                 {"vm": g.name, "functions": functions(prefix, n), **extra})
    after = await asyncio.to_thread(
        g.lab.wait_guest_pci, lambda seen: len(seen - before) >= n, 60)
    groups = new_slots(before, after)
    assert len(groups) == 1, f"functions spread over several guest slots: {groups}"
    assert next(iter(groups.values())) == set(range(n))
    return reply, before


async def detach_and_see(client: Client, g: Guest, ids: list[str], before: set[str]) -> None:
    seen_msgs = len(g.lab.kernel_messages())
    reply = await client.execute("device-detach", {"vm": g.name, "ids": ids})
    assert sorted(reply["ids"]) == sorted(ids)
    if EXPECTED_POLICY[g.machine] == "pcie-native":
        # The unplug went through the attention button and the guest waited out its window
        # before powering the slot off: the guest's own pciehp says so, not a clock.
        said = g.lab.kernel_messages()[seen_msgs:]
        assert button_then_power_off(said), said
    event = await client.wait_event("SLOT_DETACHED", 30)
    assert sorted(event["data"]["ids"]) == sorted(ids)
    seen = await asyncio.to_thread(g.lab.wait_guest_pci, lambda s: s == before, 30)
    assert seen == before
    peripheral, in_pci = await qemu_view(g.lab)
    assert not set(ids) & (peripheral | in_pci), "QEMU still holds detached functions"


def button_then_power_off(messages: list[str]) -> bool:
    """pciehp's account of a native unplug: the attention button, then (after its 5 s window,
    during which a second press would cancel) the slot powered off because of it."""
    pressed = [i for i, m in enumerate(messages) if "Attention button pressed" in m]
    off = [i for i, m in enumerate(messages) if "Powering off due to button press" in m]
    return bool(pressed and off and pressed[0] < off[-1])


def test_policy_chosen(guest: Guest) -> None:
    assert guest.info["arch"] == EXPECTED_ARCH.get(guest.machine, "x86_64")
    assert guest.info["policy"] == EXPECTED_POLICY[guest.machine]


@pytest.mark.parametrize("n", [2, 4, 8])
async def test_attach_then_detach_whole_slot(client: Client, guest: Guest, n: int) -> None:
    prefix = f"m{n}"
    reply, before = await attach_and_see(client, guest, prefix, n)
    assert [f["function"] for f in reply["functions"]] == list(range(n))
    # Plug order: every non-zero function first, function 0 last with multifunction=on.
    fns = [int(s["arguments"]["addr"].split(".")[1], 16) for s in reply["steps"]]
    assert fns[-1] == 0 and sorted(fns[:-1]) == list(range(1, n))
    assert reply["steps"][-1]["arguments"]["multifunction"] is True
    slots = await client.execute("query-slots", {"vm": guest.name})
    mine = [s for s in slots if s["bus"] == reply["bus"] and s["slot"] == reply["slot"]]
    assert [f["id"] for f in mine[0]["functions"]] == [f"{prefix}f{i}" for i in range(n)]
    await detach_and_see(client, guest, [f"{prefix}f{i}" for i in range(n)], before)


async def test_single_function_takes_the_ordinary_path(client: Client, guest: Guest) -> None:
    reply, before = await attach_and_see(client, guest, "single", 1)
    assert "multifunction" not in reply["steps"][0]["arguments"]
    await detach_and_see(client, guest, ["singlef0"], before)


@pytest.mark.parametrize("bad_function", [2, 0])
async def test_bad_property_fails_whole_attach(client: Client, guest: Guest,
                                               bad_function: int) -> None:
    """A function QEMU refuses makes the whole attach fail, and nothing is left anywhere."""
    before = guest.lab.guest_pci() or set()
    slots_before = await client.execute("query-slots", {"vm": guest.name})
    funcs = functions(f"bad{bad_function}", 4)
    funcs[bad_function]["properties"] = refused_by_qemu(funcs[bad_function]["driver"])
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-attach", {"vm": guest.name, "functions": funcs})
    assert err.value.error_class == "QemuError"
    assert f"bad{bad_function}f{bad_function}" in str(err.value)
    assert "nosuch" in str(err.value)
    ids = {f["id"] for f in funcs}
    peripheral, in_pci = await qemu_view(guest.lab)
    assert not ids & (peripheral | in_pci), "rollback left functions in QEMU"
    assert await client.execute("query-slots", {"vm": guest.name}) == slots_before
    await asyncio.sleep(1.0)  # give the guest time to show anything stray
    assert guest.lab.guest_pci() == before


async def test_detach_naming_part_of_a_slot_is_a_conflict(client: Client, guest: Guest) -> None:
    _, before = await attach_and_see(client, guest, "part", 3)
    with pytest.raises(ExecuteError) as err:
        await client.execute("device-detach", {"vm": guest.name, "ids": ["partf1"]})
    assert err.value.error_class == "Conflict"
    assert "partf0" in str(err.value) and "partf2" in str(err.value)
    assert len(guest.lab.guest_pci() or set()) == len(before) + 3  # nothing was removed
    reply = await client.execute("device-detach",
                                 {"vm": guest.name, "ids": ["partf1"], "whole-slot": True})
    assert sorted(reply["ids"]) == ["partf0", "partf1", "partf2"]
    await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: s == before, 30)


async def test_dry_run_sends_nothing(client: Client, guest: Guest) -> None:
    plan = await client.execute("device-attach", {"vm": guest.name,
                                                  "functions": functions("dry", 3),
                                                  "dry-run": True})
    assert plan["dry-run"] is True
    assert [s["execute"] for s in plan["steps"]] == ["device_add"] * 3
    peripheral, _ = await qemu_view(guest.lab)
    assert not {"dryf0", "dryf1", "dryf2"} & peripheral


async def test_two_clients_never_get_the_same_slot(daemon: Path, guest: Guest) -> None:
    a, b = await connect(daemon), await connect(daemon)
    try:
        before = guest.lab.guest_pci() or set()
        ra, rb = await asyncio.gather(
            a.execute("device-attach", {"vm": guest.name, "functions": functions("ca", 2)}),
            b.execute("device-attach", {"vm": guest.name, "functions": functions("cb", 2)}))
        assert (ra["bus"], ra["slot"]) != (rb["bus"], rb["slot"])
        after = await asyncio.to_thread(guest.lab.wait_guest_pci,
                                        lambda s: len(s - before) >= 4, 60)
        assert sorted(map(sorted, new_slots(before, after).values())) == [[0, 1], [0, 1]]
        await asyncio.gather(
            a.execute("device-detach", {"vm": guest.name, "ids": ["caf0", "caf1"]}),
            b.execute("device-detach", {"vm": guest.name, "ids": ["cbf0", "cbf1"]}))
        await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: s == before, 30)
    finally:
        await a.qmp.disconnect()
        await b.qmp.disconnect()


async def test_unplug_timeout_then_late_completion(client: Client, guest: Guest) -> None:
    """A guest that does not answer: Timeout, slot 'unplugging', a second detach is refused, and
    the late DEVICE_DELETED still completes the slot once the guest runs again."""
    _, before = await attach_and_see(client, guest, "slow", 2)
    await qemu_execute(guest.lab, "stop")
    try:
        with pytest.raises(ExecuteError) as err:
            await client.execute("device-detach", {"vm": guest.name, "ids": ["slowf0", "slowf1"],
                                                   "timeout": 2})
        assert err.value.error_class == "Timeout"
        slots = await client.execute("query-slots", {"vm": guest.name})
        states = {f["id"]: f["state"] for s in slots for f in s["functions"]}
        assert states["slowf0"] == states["slowf1"] == "unplugging"
        with pytest.raises(ExecuteError) as again:
            await client.execute("device-detach", {"vm": guest.name,
                                                   "ids": ["slowf0", "slowf1"]})
        assert again.value.error_class == "Conflict"
    finally:
        await qemu_execute(guest.lab, "cont")
    event = await client.wait_event("SLOT_DETACHED", 60)
    assert sorted(event["data"]["ids"]) == ["slowf0", "slowf1"]
    await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: s == before, 30)
    peripheral, _ = await qemu_view(guest.lab)
    assert not {"slowf0", "slowf1"} & peripheral


async def test_second_detach_while_first_is_pending_is_a_conflict(daemon: Path, client: Client,
                                                                   guest: Guest) -> None:
    """A second detach of a slot whose unplug is pending is refused, not sent, and the first
    completes. Native PCIe is where it matters: a second attention-button press inside the 5 s
    window would cancel the unplug in the guest (pciehp). ACPI ejects within milliseconds, so
    there the guest is paused to hold the unplug pending."""
    native = EXPECTED_POLICY[guest.machine] == "pcie-native"
    _, before = await attach_and_see(client, guest, "dbl", 2)
    ids = ["dblf0", "dblf1"]
    if not native:
        await qemu_execute(guest.lab, "stop")
    seen_msgs = len(guest.lab.kernel_messages())
    first = asyncio.create_task(client.execute("device-detach", {"vm": guest.name, "ids": ids}))
    other = await connect(daemon)
    try:
        for _ in range(100):  # until the first detach has sent its device_del (bounded: 10 s)
            slots = await other.execute("query-slots", {"vm": guest.name})
            if {f["state"] for s in slots for f in s["functions"] if f["id"] in ids} \
                    == {"unplugging"}:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the first detach never showed the slot as unplugging")
        with pytest.raises(ExecuteError) as err:
            await other.execute("device-detach", {"vm": guest.name, "ids": ids})
        assert err.value.error_class == "Conflict"
    finally:
        await other.qmp.disconnect()
        if not native:
            await qemu_execute(guest.lab, "cont")
    reply = await asyncio.wait_for(first, 60)
    assert sorted(reply["ids"]) == ids
    if native:   # one button press, not two (a second press would have cancelled the first)
        said = guest.lab.kernel_messages()[seen_msgs:]
        assert button_then_power_off(said), said
        assert len([m for m in said if "Attention button pressed" in m]) == 1, said
    seen = await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: s == before, 30)
    assert seen == before
    peripheral, in_pci = await qemu_view(guest.lab)
    assert not set(ids) & (peripheral | in_pci)


async def test_query_policy_shows_mechanism_and_timeouts(client: Client, guest: Guest) -> None:
    policy = await client.execute("query-policy", {"vm": guest.name})
    assert policy["policy"] == EXPECTED_POLICY[guest.machine]
    assert policy["timeouts"]["unplug"] > 0 and policy["timeouts"]["plug"] > 0
    assert {b["mechanism"] for b in policy["buses"]} == {EXPECTED_POLICY[guest.machine]}


async def test_detach_right_after_attach_waits_for_the_guest(daemon: Path, client: Client,
                                                              guest: Guest) -> None:
    """Orchestrators undo a step at once. Detach sent the moment attach returns, three rounds:
    on native PCIe QEMU refuses device_del while the guest is still powering the slot ("guest
    is busy"); qmpfd waits that out within the request's time, and shows the wait (reply and
    query-operations). The guest's own view is back to its starting set after every round, and
    QEMU (second monitor) holds none of the functions."""
    start = await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: True, 5)
    watcher = await connect(daemon)   # a connection's requests run in order: watch on another
    waited_rounds = 0
    for r in range(3):
        reply = await client.execute("device-attach", {"vm": guest.name,
                                                       "functions": functions(f"rb{r}", 4)})
        ids = [f["id"] for f in reply["functions"]]
        detach = asyncio.create_task(client.execute("device-detach",
                                                    {"vm": guest.name, "ids": ids}))
        shown = False
        while not detach.done():
            ops = await watcher.execute("query-operations", {"vm": guest.name})
            shown |= any("guest is busy" in op.get("waiting", "") for op in ops)
            await asyncio.sleep(0.02)
        detached = await detach
        assert sorted(detached["ids"]) == sorted(ids)
        if "waited-for-guest" in detached:
            waited_rounds += 1
            assert shown, "query-operations never showed the wait"
        await asyncio.to_thread(guest.lab.wait_guest_pci, lambda s: s == start, 60)
        peripheral, in_pci = await qemu_view(guest.lab)
        assert not set(ids) & (peripheral | in_pci), "QEMU still holds detached functions"
    await watcher.qmp.disconnect()
    if EXPECTED_POLICY[guest.machine] == "pcie-native":
        assert waited_rounds >= 1, "the guest was never busy: the case was not exercised"
    else:
        assert waited_rounds == 0, "ACPI hotplug has no busy refusal"
    now = guest.lab.guest_pci() or set()
    slots = await client.execute("query-slots", {"vm": guest.name})
    mine = [f for s in slots for f in s["functions"] if f["id"] and f["id"].startswith("rb")]
    MATRIX.append(MatrixRow(
        f"detach right after attach, 3 rounds ({guest.machine})",
        f"guest busy waited out in {waited_rounds} of 3" if waited_rounds else "no wait needed",
        "none" if not {i for i in peripheral if i.startswith("rb")} else "left behind",
        "back to its starting set" if now == start else "changed",
        "no slot, no operation" if not mine else "slot left", "pass"))
