from qmpfd.hotplug.recovery import Action, decide
from qmpfd.state.journal import Operation


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
