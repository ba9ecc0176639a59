"""The slot table's states and transitions, without QEMU (qmpfd.hotplug.slots)."""

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmpfd.errors import Conflict, InvalidRequest, NotFound, Unsupported
from qmpfd.hotplug.choice import choose_slot
from qmpfd.hotplug.pending import PendingSlot
from qmpfd.hotplug.slots import SlotState, SlotStateError, SlotTable
from qmpfd.hotplug.slotview import view
from qmpfd.hotplug.spec import FunctionSpec
from qmpfd.qemu.topology import Bus, RawDevice, peripheral
from tests.unit.topologies import pc_raw, q35_raw, topo

S = SlotState
KEY = ("pci.0", 5)


def table() -> SlotTable:
    return SlotTable(topo(pc_raw()))


def entry(key: tuple[str, int], *ids: str) -> PendingSlot:
    """A queue holding ``ids`` as functions 1, 2, ..."""
    q = PendingSlot(key[0], key[1], expires_at=100.0)
    for n, dev_id in enumerate(ids, 1):
        q.add(FunctionSpec(dev_id, "e1000", n))
    return q


def dev(dev_id: str, fn: int, slot: int = 5) -> RawDevice:
    return peripheral(dev_id, "virtio-rng-pci", slot, fn)


def test_states_read_from_the_topology() -> None:
    t = table()
    assert t.state(("pci.0", 0)) is S.PRESENT         # host bridge
    assert t.state(KEY) is S.EMPTY
    t.reserve(KEY, ["a", "b"])
    t.added(KEY, [dev("b", 1)])
    t.attach_undone(KEY, [])
    # QEMU kept nothing by qmpfd's account, but the topology says function 1 is there: orphaned
    assert t.state(KEY) is S.ORPHANED
    assert t.orphans() == [(KEY, ["b"])]


def test_attach_path_empty_attaching_present() -> None:
    t = table()
    t.reserve(KEY, ["a", "b"])
    assert t.state(KEY) is S.ATTACHING
    assert t.claim(KEY) is not None and t.claim(KEY).ids == ("a", "b")  # type: ignore[union-attr]
    t.added(KEY, [dev("b", 1)])
    t.added(KEY, [dev("a", 0)])
    assert t.state(KEY) is S.ATTACHING              # the claim wins until the attach says so
    t.attach_done(KEY)
    assert t.state(KEY) is S.PRESENT
    assert t.find("a") == KEY and t.find("b") == KEY


def test_rollback_that_must_wait_is_unplugging_then_empty() -> None:
    t = table()
    t.reserve(KEY, ["a", "b"])
    t.added(KEY, [dev("b", 1)])
    t.attach_undone(KEY, ["b"])
    assert t.state(KEY) is S.UNPLUGGING
    with pytest.raises(Conflict):
        t.check_free(KEY)
    t.deleted("b")
    t.unplug_ended(KEY)
    assert t.state(KEY) is S.EMPTY


def test_detach_path_and_a_guest_refusal_returns_to_present() -> None:
    t = table()
    t.reserve(KEY, ["a"])
    t.added(KEY, [dev("a", 0)])
    t.attach_done(KEY)
    t.begin_unplug(KEY, ["a"])
    assert t.state(KEY) is S.UNPLUGGING
    t.unplug_ended(KEY)                 # no DEVICE_DELETED came: QEMU still holds it
    assert t.state(KEY) is S.PRESENT
    t.begin_unplug(KEY, ["a"])
    t.deleted("a")
    t.unplug_ended(KEY)
    assert t.state(KEY) is S.EMPTY


def test_queue_and_unqueue() -> None:
    t = table()
    t.queue(KEY, entry(KEY, "q1"))
    t.queue(KEY, entry(KEY, "q1", "q2"))
    assert t.state(KEY) is S.QUEUED and t.claim(KEY).ids == ("q1", "q2")  # type: ignore[union-attr]
    assert {"q1", "q2"} <= t.ids_in_use() and t.queued_ids() == {"q1", "q2"}
    assert t.queued(KEY) is not None and [q.slot for q in t.queues()] == [5]
    flushed = t.unqueue(KEY)
    assert list(flushed.functions) == [1, 2]
    assert t.state(KEY) is S.EMPTY and t.queued(KEY) is None and t.queues() == []


@pytest.mark.parametrize("setup,transition", [
    ("present", "reserve"), ("attaching", "reserve"), ("empty", "attach_done"),
    ("empty", "begin_unplug"), ("attaching", "begin_unplug"), ("unplugging", "reserve"),
    ("empty", "unqueue"), ("present", "queue"),
])
def test_transitions_refused_from_the_wrong_state(setup: str, transition: str) -> None:
    t = table()
    if setup in ("present", "attaching", "unplugging"):
        t.reserve(KEY, ["a"])
        if setup != "attaching":
            t.added(KEY, [dev("a", 0)])
            t.attach_done(KEY)
        if setup == "unplugging":
            t.begin_unplug(KEY, ["a"])
    before = t.state(KEY)
    calls = {"reserve": lambda: t.reserve(KEY, ["z"]), "attach_done": lambda: t.attach_done(KEY),
             "begin_unplug": lambda: t.begin_unplug(KEY, ["a"]), "unqueue": lambda: t.unqueue(KEY),
             "queue": lambda: t.queue(KEY, entry(KEY, "z")),
             "added": lambda: t.added(KEY, [dev("z", 0)])}
    with pytest.raises(SlotStateError, match=f"slot: pci.0 slot 5 is {before.value}"):
        calls[transition]()
    assert t.state(KEY) is before       # a refused transition changes nothing


def test_one_check_one_message() -> None:
    t = table()
    t.reserve(KEY, ["a", "b"])
    with pytest.raises(Conflict, match=r"slot: pci.0 slot 5 is taken \(attaching: a, b\)"):
        t.check_free(KEY)
    with pytest.raises(Conflict, match=r"functions\.0\.id: id 'a' is in use by pci\.0 slot 5"):
        t.check_new_ids([("functions.0.id", "a")])
    with pytest.raises(Conflict, match="id: a device with id 'br1' already exists"):
        t.check_new_ids([("id", "br1")])
    with pytest.raises(InvalidRequest, match=r"slot: bus 'pci\.0' has slots 0-31"):
        t.check_slot_number(t.bus("pci.0"), 32)
    with pytest.raises(NotFound, match="bus: no PCI bus 'nope'"):
        t.bus("nope")


def test_choose_first_free_and_refusals() -> None:
    t = table()
    assert choose_slot(t, None, None) == ("pci.0", 3)     # 0 host, 1 PIIX, 2 bridge... first free
    t.reserve(("pci.0", 3), ["x"])
    assert choose_slot(t, None, None) == ("pci.0", 4)
    with pytest.raises(InvalidRequest, match="slot: given without bus"):
        choose_slot(t, None, 7)
    with pytest.raises(Conflict, match=r"slot: pci\.0 slot 3 is taken"):
        choose_slot(t, "pci.0", 3)
    native = SlotTable(topo(q35_raw(native=True)))
    with pytest.raises(Unsupported, match=r"bus: 'pcie\.0' does not support hotplugging"):
        choose_slot(native, "pcie.0", None)


def test_refresh_keeps_claims() -> None:
    t = table()
    t.reserve(KEY, ["a"])
    t.refresh(topo(pc_raw()))
    assert t.state(KEY) is S.ATTACHING


def test_view_shows_claims_and_queued_functions() -> None:
    t = table()
    t.queue(("pci.0", 6), entry(("pci.0", 6), "q1"))
    t.reserve(KEY, ["a"])
    t.added(KEY, [dev("a", 0)])
    views = {(v.bus, v.slot): v for v in view(t, {("pci.0", 6): [(1, "q1", "e1000")]})}
    assert views[KEY].state is S.ATTACHING
    assert [(f.function, f.id) for f in views[KEY].functions] == [(0, "a")]
    assert views[("pci.0", 6)].state is S.QUEUED
    assert [(f.function, f.id, f.state) for f in views[("pci.0", 6)].functions] == [
        (1, "q1", S.QUEUED)]


def test_a_slot_held_back_is_chosen_last_and_says_how_long() -> None:
    t = table()
    t.hold_back(("pci.0", 3), until=12.0, now=10.0)
    assert t.held_back(("pci.0", 3), now=10.5) == 1.5
    assert t.held_back(("pci.0", 3), now=12.5) == 0.0
    assert choose_slot(t, None, None, now=10.0) == ("pci.0", 4)       # another free slot first
    assert choose_slot(t, None, None, now=12.0) == ("pci.0", 3)       # over: the first free again
    assert choose_slot(t, "pci.0", 3, now=10.0) == ("pci.0", 3)       # named: the caller waits
    for b in t.topology.buses:
        for n in range(b.slot_count):
            if (b.name, n) != ("pci.0", 3) and t.state((b.name, n)) is S.EMPTY:
                t.reserve((b.name, n), [f"x{b.name}{n}"])
    assert choose_slot(t, None, None, now=10.0) == ("pci.0", 3)   # the only one, after a wait


def test_a_refresh_keeps_what_changed_while_it_read() -> None:
    """A read of QEMU that began before a device_add or a DEVICE_DELETED and ends after it
    does not undo it (several clients refreshing beside attaches)."""
    t = table()
    t.reserve(KEY, ["a"])
    t.reserve(("pci.0", 6), ["gone"])
    t.added(("pci.0", 6), [dev("gone", 0, slot=6)])
    t.attach_done(("pci.0", 6))
    mark = t.read_started()
    stale = t.topology                                        # what the read returns: no "a"...
    t.added(KEY, [dev("a", 0)])
    t.deleted("gone")
    t.refresh(stale, mark)                                    # ...but still "gone"
    assert t.find("a") == KEY and t.find("gone") is None
    later = t.read_started()
    t.refresh(t.topology, later)                              # a read that already has "a"
    assert [f.id for f in t.functions(KEY)] == ["a"]          # not twice


def test_an_abandoned_read_changes_nothing() -> None:
    t = table()
    t.read_started()
    t.read_abandoned()
    t.reserve(KEY, ["a"])
    t.added(KEY, [dev("a", 0)])
    t.refresh(topo(pc_raw()))                                 # a plain refresh replaces
    assert t.find("a") is None


async def test_the_work_on_a_slot_is_one_object_with_a_future_that_ends_once() -> None:
    t = table()
    work = t.reserve(KEY, ["a", "b"])
    ended = work.when_ended()
    t.recorded(KEY, "op-1")
    assert t.claim(KEY) is work and work.operation == "op-1"
    t.added(KEY, [dev("b", 1)])
    t.attach_undone(KEY, ["b"])                        # the rollback waits for the guest
    assert t.claim(KEY) is work and work.state is S.UNPLUGGING and work.ids == ("b",)
    assert not ended.done() and t.in_flight() == [work]
    t.deleted("b")
    t.unplug_ended(KEY)
    assert ended.done() and work.ended and t.claim(KEY) is None
    assert work.when_ended().done()                    # asked after the end: done at once
    with pytest.raises(SlotStateError, match=r"is unplugging \(ended\); end needs"):
        work.end()                                     # ended once, never twice


def test_a_transition_says_where_it_may_start() -> None:
    t = table()
    work = t.reserve(KEY, ["a"])
    with pytest.raises(SlotStateError,
                       match=r"pci\.0 slot 5 is attaching; add_to_queue needs queued"):
        work.add_to_queue(entry(KEY, "q"))
    assert work.queue is None and work.state is S.ATTACHING


def test_an_old_unplug_does_not_end_the_work_that_took_its_slot_over() -> None:
    """Recovery took an unplugging slot over (a reconnect's reconcile): the unplug that was
    watching before must not end the new work when its own wait ends."""
    t = table()
    t.reserve(KEY, ["a"])
    t.added(KEY, [dev("a", 0)])
    t.attach_done(KEY)
    old = t.begin_unplug(KEY, ["a"])
    t.wait_unplug(KEY, ["a"], "op-7")
    new = t.claim(KEY)
    assert old.ended and new is not None and new is not old and new.operation == "op-7"
    t.unplug_ended(KEY, old)
    assert t.claim(KEY) is new and t.state(KEY) is S.UNPLUGGING
    t.unplug_ended(KEY, new)
    assert t.state(KEY) is S.PRESENT                  # QEMU still holds it: present again


def test_recorded_after_the_work_ended_changes_nothing() -> None:
    t = table()
    t.reserve(KEY, ["a"])
    t.attach_undone(KEY, [])
    t.recorded(KEY, "op-2")                           # the guest emptied it meanwhile
    assert t.claim(KEY) is None and t.state(KEY) is S.EMPTY


def _first_free_by_scan(t: SlotTable, from_top: bool, now: float) -> tuple[str, int] | None:
    """The slot choice as a scan of every slot of every hotpluggable bus (each slot's state
    and its own hotpluggable flag): the reference the bus's free-slot list must agree with."""
    later: list[tuple[float, tuple[str, int]]] = []
    for b in (b for b in t.topology.buses if b.hotpluggable):
        order = range(b.slot_count - 1, -1, -1) if from_top else range(b.slot_count)
        for n in order:
            if t.state((b.name, n)) is S.EMPTY and b.slot(n).hotpluggable:
                wait = t.held_back((b.name, n), now)
                if not wait:
                    return b.name, n
                later.append((wait, (b.name, n)))
    return min(later)[1] if later else None


@settings(max_examples=200, deadline=None)
@given(raw=st.sampled_from(["pc", "q35-native", "q35-acpi"]),
       plugged=st.lists(st.tuples(st.integers(0, 31), st.integers(0, 7)), max_size=40),
       claimed=st.lists(st.integers(0, 31), max_size=10),
       held=st.lists(st.tuples(st.integers(0, 31), st.floats(0, 10)), max_size=5),
       deleted=st.lists(st.integers(0, 40), max_size=10), drop_bridge=st.booleans(),
       from_top=st.booleans())
def test_slot_choice_agrees_with_a_scan_of_every_slot(
        raw: str, plugged: list[tuple[int, int]], claimed: list[int],
        held: list[tuple[int, float]], deleted: list[int], drop_bridge: bool,
        from_top: bool) -> None:
    """Whatever QEMU holds, whatever is claimed or held back: the first free slot read from
    each bus's free-slot list is the one a scan of every slot finds (or neither finds one).
    Devices arrive and leave one by one through the table (an attach's device_add, QEMU's
    DEVICE_DELETED), so each topology is derived from the previous one."""
    raws = pc_raw() if raw == "pc" else q35_raw(native=raw == "q35-native")
    t = SlotTable(topo(raws))
    buses = [b for b in t.topology.buses if b.hotpluggable]
    for i, (n, fn) in enumerate(plugged):
        b = buses[i % len(buses)]
        if n < b.slot_count and b.slot(n).hotpluggable:
            t.added((b.name, n), [peripheral(f"d{i}", "e1000", n, fn)])
    for i in deleted:                   # DEVICE_DELETED, some for ids QEMU never had
        t.deleted(f"d{i}")
    if drop_bridge:                     # a bridge goes, and the bus behind it with its devices
        t.deleted("br1")
    for i, n in enumerate(claimed):
        b = buses[i % len(buses)]
        if n < b.slot_count and t.state((b.name, n)) is S.EMPTY:
            t.reserve((b.name, n), [f"c{i}"])
    for i, (n, until) in enumerate(held):
        t.hold_back((buses[i % len(buses)].name, n), until, 0.0)
    expected = _first_free_by_scan(t, from_top, 1.0)
    if expected is None:
        with pytest.raises(Conflict):
            choose_slot(t, None, None, from_top, now=1.0)
    else:
        assert choose_slot(t, None, None, from_top, now=1.0) == expected
    # the ids carried over from one topology to the next are the ones a recount finds
    recounted = {d.id for b in t.topology.buses for d in b.devices if d.id is not None}
    assert t.topology.device_ids() == recounted
    for b in t.topology.buses:          # slot lists carried over = built from scratch
        fresh = Bus(b.name, b.path, b.mechanism, b.slot_count, b.owner_type, b.devices)
        assert b.free_slots == fresh.free_slots
        assert {n: b.slot(n) for n in range(32)} == {n: fresh.slot(n) for n in range(32)}


def test_an_automatic_choice_builds_no_slot_and_recounts_no_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted, not timed: choosing a slot reads the bus's free-slot list (no Slot object per
    slot of every bus), and a topology after a device_add takes the ids of the one before it
    plus the new ones (no recount over every device, once per attach)."""
    t = table()
    t.check_new_ids([("id", "x")])                  # the ids known, as after the first attach
    choose_slot(t, None, None)                      # and the free slots
    t.added(KEY, [dev("a", 0)])
    assert "_device_ids" in t.topology.__dict__     # carried over, not computed again
    t.added(("pci.0", 6), [dev("b", 0, slot=6)])
    bridge_bus = t.topology.bus("br1")
    t.deleted("b")
    assert "_device_ids" in t.topology.__dict__ and t.topology.device_ids() >= {"a", "br1"}
    assert t.topology.bus("br1") is bridge_bus      # a bus nothing left keeps its slot lists
    assert "free_slots" in t.topology.bus("pci.0").__dict__   # the changed one: carried over
    built = 0
    real = Bus.slot

    def counted(self: Bus, number: int) -> Any:
        nonlocal built
        built += 1
        return real(self, number)

    monkeypatch.setattr(Bus, "slot", counted)
    assert choose_slot(t, None, None) == ("pci.0", 3)
    assert built == 0
