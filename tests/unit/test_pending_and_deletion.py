import asyncio
import time

import pytest

from qmpfd.errors import Conflict, QemuError, VmGone
from qmpfd.hotplug.deletion import DeletionTracker
from qmpfd.hotplug.pending import PendingSlot, preview, restore
from qmpfd.hotplug.plan import FunctionSpec

Queues = dict[tuple[str, int], PendingSlot]


def queue(q: Queues, spec: FunctionSpec, bus: str, slot: int, ttl: float) -> PendingSlot:
    entry = preview(q.get((bus, slot)), spec, bus, slot, ttl)
    q[(bus, slot)] = entry
    return entry


def test_queue_refuses_duplicate_function_and_id_without_changing() -> None:
    q: Queues = {}
    queue(q, FunctionSpec("a", "e1000", 2), "pci.0", 5, ttl=60)
    with pytest.raises(Conflict, match="function 2"):
        queue(q, FunctionSpec("b", "e1000", 2), "pci.0", 5, ttl=60)
    with pytest.raises(Conflict, match="'a'"):
        queue(q, FunctionSpec("a", "e1000", 3), "pci.0", 5, ttl=60)
    entry = q.get(("pci.0", 5))
    assert entry is not None and list(entry.functions) == [2]


def test_queue_expiry_is_from_first_function() -> None:
    q: Queues = {}
    first = queue(q, FunctionSpec("a", "e1000", 1), "pci.0", 5, ttl=10)
    second = queue(q, FunctionSpec("b", "e1000", 2), "pci.0", 5, ttl=500)
    assert second.expires_at == first.expires_at <= time.monotonic() + 10


async def test_waits_for_every_function_and_ignores_child_paths() -> None:
    t = DeletionTracker()
    done = t.expect(["f0", "f1"])
    t.handle_event({"event": "DEVICE_DELETED",
                    "data": {"path": "/machine/peripheral/f0/virtio-backend"}})
    t.handle_event({"event": "DEVICE_DELETED", "data": {"device": "f1", "path": "x"}})
    assert not done.done() and t.pending(done) == {"f0"}
    t.handle_event({"event": "DEVICE_DELETED", "data": {"device": "f0", "path": "x"}})
    await asyncio.wait_for(done, 1)


async def test_guest_error_and_disconnect_fail_the_wait() -> None:
    t = DeletionTracker()
    a, b = t.expect(["x"]), t.expect(["y"])
    t.handle_event({"event": "DEVICE_UNPLUG_GUEST_ERROR", "data": {"device": "x"}})
    with pytest.raises(QemuError, match="guest refused"):
        await a
    t.handle_event({"event": "QMPFD_DISCONNECTED", "data": {}})
    with pytest.raises(VmGone):
        await b


async def test_expect_nothing_is_done_at_once() -> None:
    assert DeletionTracker().expect([]).done()


def test_queue_record_round_trip_keeps_functions_and_remaining_time() -> None:
    q: Queues = {}
    entry = queue(q, FunctionSpec("n1", "e1000", 1, {"mac": "52:54:00:00:00:01"}), "pci.0", 5,
                    ttl=300)
    queue(q, FunctionSpec("n2", "virtio-rng-pci", 2), "pci.0", 5, ttl=300)
    # Saved at monotonic 1000 / wall 50_000; restored in a new process at monotonic 20 and
    # wall 50_100: 100 s of the 300 have passed.
    rec = entry.to_record(now_mono=entry.expires_at - 300, now_wall=50_000)
    (again,) = restore([rec], now_mono=20.0, now_wall=50_100)
    assert (again.bus, again.slot) == ("pci.0", 5)
    assert again.functions == entry.functions
    assert again.expires_at == pytest.approx(20.0 + 200)


def test_unreadable_queue_records_are_skipped() -> None:
    good = {"bus": "pci.0", "slot": 3, "expires": 10.0,
            "functions": [{"id": "a1", "driver": "e1000", "function": 1}]}
    bad = [{"bus": "pci.0"}, {"bus": "pci.0", "slot": "x", "expires": 1, "functions": []},
           {"bus": "pci.0", "slot": 4, "expires": 1, "functions": [
               {"id": "d", "driver": "e1000", "function": 1},
               {"id": "d", "driver": "e1000", "function": 2}]}]
    restored = restore([*bad, good], now_mono=0.0, now_wall=0.0)
    assert [(e.bus, e.slot) for e in restored] == [("pci.0", 3)]


async def test_deletions_are_numbered_and_told_whether_asked() -> None:
    t = DeletionTracker()
    heard: list[tuple[str, bool]] = []
    t.on_deleted.append(lambda dev, asked: heard.append((dev, asked)))
    done = t.expect(["a"])
    mark = t.seq
    t.handle_event({"event": "DEVICE_DELETED", "data": {"device": "a", "path": "x"}})
    t.handle_event({"event": "DEVICE_DELETED", "data": {"device": "b", "path": "y"}})
    await asyncio.wait_for(done, 1)
    assert heard == [("a", True), ("b", False)]               # "b": nobody asked
    assert t.deleted_since(mark) == {"a", "b"} and t.deleted_since(t.seq) == set()


def test_deleted_since_reads_only_what_is_newer_than_the_mark() -> None:
    """Asked after every device_add's reply: it reads the deletions after the mark and stops
    (counted), not every one remembered (a long-running daemon remembers thousands)."""
    import collections

    from qmpfd.hotplug import deletion

    read = [0]

    class Counting(collections.deque):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for item in super().__iter__():
                read[0] += 1
                yield item

        def __reversed__(self):  # type: ignore[no-untyped-def]
            for item in super().__reversed__():
                read[0] += 1
                yield item
    t = DeletionTracker()
    t._recent = Counting(maxlen=deletion.REMEMBERED)
    for i in range(deletion.REMEMBERED):
        t.handle_event({"event": "DEVICE_DELETED", "data": {"device": f"d{i}", "path": "x"}})
    mark = t.seq
    assert t.deleted_since(mark) == set() and read[0] <= 1
    t.handle_event({"event": "DEVICE_DELETED", "data": {"device": "new", "path": "x"}})
    read[0] = 0
    assert t.deleted_since(mark) == {"new"} and read[0] <= 2
    assert t.deleted_since(mark - 2) == {"new", f"d{deletion.REMEMBERED - 1}",
                                         f"d{deletion.REMEMBERED - 2}"}
