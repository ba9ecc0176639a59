"""The event ring behind query-events (qmpfd.api.eventlog): seq and boot on every event, replay
after a seq, and a clear 'incomplete' when the ring dropped events or qmpfd restarted."""

from qmpfd.api.eventlog import EventLog


def test_events_are_numbered_and_replayed_after_a_seq() -> None:
    log = EventLog(size=16)
    sent = [log.record("SLOT_ATTACHED", {"vm": "a", "n": i}) for i in range(5)]
    assert [m["data"]["seq"] for m in sent] == [1, 2, 3, 4, 5]
    assert {m["data"]["boot"] for m in sent} == {log.boot}
    r = log.replay(since=2, boot=log.boot)
    assert r.complete and [m["data"]["seq"] for m in r.events] == [3, 4, 5] and r.last == 5
    assert log.replay(since=5, boot=log.boot).events == []
    assert log.replay(since=None, boot=None).complete


def test_a_gap_the_ring_no_longer_holds_is_reported() -> None:
    log = EventLog(size=16)
    for i in range(40):
        log.record("FUNCTION_QUEUED", {"vm": "a", "n": i})
    r = log.replay(since=10, boot=log.boot)
    assert not r.complete and r.reason is not None and "11-24" in r.reason
    assert [m["data"]["seq"] for m in r.events] == list(range(25, 41))
    assert log.replay(since=24, boot=log.boot).complete


def test_another_boot_means_start_over() -> None:
    log = EventLog(size=16)
    log.record("VM_RECONNECTED", {"vm": "a"})
    r = log.replay(since=3, boot="an-earlier-run")
    assert not r.complete and "restarted" in (r.reason or "")


def test_a_seq_this_run_never_issued_is_not_a_complete_replay() -> None:
    """A plane that reconnects to a restarted qmpfd without passing ``boot`` gives a seq of the
    earlier run: the reply must not claim it missed nothing."""
    log = EventLog(16)
    for _ in range(3):
        log.record("SLOT_ATTACHED", {"vm": "v"})
    r = log.replay(since=500, boot=None)
    assert not r.complete and r.reason is not None and "never issued" in r.reason
    assert [int(e["data"]["seq"]) for e in r.events] == [1, 2, 3]
    assert log.replay(since=3, boot=None).complete                  # the newest: nothing new
