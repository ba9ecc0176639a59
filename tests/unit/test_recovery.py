import json
from pathlib import Path

from qmpfd.hotplug.recovery import Action, decide
from qmpfd.state.journal import Journal, Operation


def op(kind: str, n: int = 4, sent: bool = False) -> Operation:
    return Operation(kind, "vm1", "pci.0", 5, {f"f{i}": i for i in range(n)}, "acpi-pcihp",
                     sent=sent)


def test_attach_all_present_is_completed() -> None:
    d = decide(op("attach"), {"f0", "f1", "f2", "f3", "other"})
    assert d.action is Action.COMPLETED


def test_attach_half_done_is_rolled_back_in_function_order() -> None:
    d = decide(op("attach"), {"f3", "f1", "unrelated"})
    assert d.action is Action.ROLL_BACK and d.ids == ("f1", "f3")


def test_attach_rollback_already_sent_keeps_waiting() -> None:
    assert decide(op("attach", sent=True), {"f1"}).action is Action.KEEP_WAITING


def test_attach_nothing_present_is_forgotten() -> None:
    assert decide(op("attach"), set()).action is Action.FORGET


def test_detach_outcomes() -> None:
    assert decide(op("detach", sent=True), set()).action is Action.DETACHED
    assert decide(op("detach", sent=True), {"f0"}).action is Action.KEEP_WAITING
    # Crash before device_del was journaled as sent: send it (once) now.
    assert decide(op("detach"), {"f0", "f1"}).action is Action.SEND_UNPLUG


async def test_journal_survives_reopen_and_is_atomic(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/run/qemu/vm1.qmp")
    o = await j.begin(op("attach"))
    await j.mark_sent(o)
    again = Journal.open(tmp_path)
    assert again.vms == {"vm1": "/run/qemu/vm1.qmp"}
    assert [x.id for x in again.for_vm("vm1")] == [o.id] and again.ops[o.id].sent
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
    await j.end(o)
    assert Journal.open(tmp_path).ops == {}


async def test_corrupt_state_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    j = Journal.open(tmp_path)
    assert j.vms == {} and (tmp_path / "state.corrupt").exists()


async def test_removing_a_vm_drops_its_operations(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/x")
    await j.begin(op("detach"))
    await j.vm_removed("vm1")
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["vms"] == {} and doc["operations"] == []
