"""The append-only journal: durability rules, group commit, torn and damaged files, compaction.

These use real files in a temporary directory (the journal *is* file handling) but no QEMU.
What can be counted is asserted: fdatasyncs per operation, writes per group.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import zlib
from pathlib import Path

import pytest

from qmpfd.state import log as log_mod
from qmpfd.state import logwriter
from qmpfd.state.journal import Journal, Operation
from qmpfd.state.log import JournalDamaged, StateWriteError


def op(kind: str = "attach", n: int = 4) -> Operation:
    return Operation(kind, "vm1", "pci.0", 5, {f"f{i}": i for i in range(n)}, "acpi-pcihp")


def line(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


async def reopened(path: Path, j: Journal) -> Journal:
    await j.drain()
    j.close()
    return Journal.open(path)


async def test_state_survives_reopen(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/run/qemu/vm1.qmp")
    o = await j.begin(op())
    j.mark_sent(o)
    again = await reopened(tmp_path, j)
    assert again.vms == {"vm1": "/run/qemu/vm1.qmp"}
    assert [x.id for x in again.for_vm("vm1")] == [o.id] and again.ops[o.id].sent
    again.end(again.ops[o.id])
    assert (await reopened(tmp_path, again)).ops == {}


async def test_attach_costs_one_sync_and_its_end_none(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    before = j.syncs
    o = await j.begin(op())
    assert j.syncs == before + 1, "begin is synced before QEMU is touched"
    j.end(o)
    await j.drain()
    assert j.syncs == before + 1, "the end record is written but not synced"
    assert o.id not in j.ops


async def test_concurrent_changes_share_syncs_and_each_is_on_disk_when_it_returns(
        tmp_path: Path) -> None:
    j = Journal.open(tmp_path)

    async def add(i: int) -> None:
        await j.vm_added(f"vm{i}", f"/run/qemu/vm{i}.qmp")
        assert f"vm{i}".encode() in (tmp_path / "journal.log").read_bytes()

    await asyncio.gather(*(add(i) for i in range(20)))
    assert j.syncs <= 3, f"{j.syncs} syncs for 20 concurrent changes (group commit)"
    assert set((await reopened(tmp_path, j)).vms) == {f"vm{i}" for i in range(20)}


async def test_failed_write_changes_nothing_and_names_the_file(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/x")
    size = (tmp_path / "journal.log").stat().st_size
    real = j._log._fd
    j._log._fd = os.open("/dev/full", os.O_WRONLY)   # every write: ENOSPC
    j._log.identity_problem = lambda: None  # type: ignore[method-assign]  # fd swapped on purpose
    with pytest.raises(StateWriteError) as err:
        await j.begin(op())
    assert str(tmp_path / "journal.log") in err.value.desc
    assert "No space left on device" in err.value.desc
    assert j.ops == {}, "memory changed although the record is not on disk"
    with pytest.raises(StateWriteError):
        await j.vm_removed("vm1")
    assert j.vms == {"vm1": "/x"}
    os.close(j._log._fd)
    j._log._fd = real
    assert (tmp_path / "journal.log").stat().st_size == size
    again = await reopened(tmp_path, j)
    assert again.ops == {} and again.vms == {"vm1": "/x"}


async def test_settle_records_are_retried_in_order(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logwriter, "RETRY_DELAY", 0.05)
    j = Journal.open(tmp_path)
    o = await j.begin(op())
    real = j._log._fd
    j._log._fd = os.open("/dev/full", os.O_WRONLY)
    j._log.identity_problem = lambda: None  # type: ignore[method-assign]  # fd swapped on purpose
    j.end(o)                                 # never fails the caller: QEMU already did it
    assert o.id not in j.ops
    await asyncio.sleep(0.12)
    os.close(j._log._fd)
    j._log._fd = real
    await asyncio.sleep(0.1)
    await j.drain()
    assert (await reopened(tmp_path, j)).ops == {}


async def test_records_nobody_waits_for_do_not_come_back_to_the_event_loop(
        tmp_path: Path) -> None:
    """A batch of settle records is handed to the writer thread and the loop's writer is done
    at once: while the thread is stuck in the write, the loop owes it nothing (no task, no
    future waiting); the records are on disk once the thread is let go."""
    import threading
    j = Journal.open(tmp_path)
    o = await j.begin(op(n=1))               # 1 function: not durable, written behind
    stuck, release = threading.Event(), threading.Event()
    real = j._log._write

    def slow(data: bytes, sync: bool) -> None:
        stuck.set()
        release.wait(10)
        real(data, sync)
    j._log._write = slow  # type: ignore[method-assign]
    j.end(o)
    await asyncio.sleep(log_mod.LAZY_WRITE_DELAY * 3)
    assert await asyncio.to_thread(stuck.wait, 5), "the batch never reached the thread"
    assert not j._log._in_flight, "the event loop waits for the thread"
    release.set()
    await j.drain()
    assert o.id.encode() in (tmp_path / "journal.log").read_bytes()
    assert (await reopened(tmp_path, j)).ops == {}


async def test_torn_last_record_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/x")
    await j.vm_added("vm2", "/y")
    j.close()
    path = tmp_path / "journal.log"
    good = path.read_bytes()
    whole = good.splitlines(keepends=True)[-1]
    path.write_bytes(good + whole[:17])       # a crash in the middle of the next append
    again = Journal.open(tmp_path)
    assert again.vms == {"vm1": "/x", "vm2": "/y"}
    assert path.read_bytes() == good, "the torn tail is cut off before new appends"


@pytest.mark.parametrize("content, cause", [
    (b"garbage that is no journal\n", "line 1: no checksum"),
    (b"\x00\x00 not a record\n", "line 1: "),
    (line(b'{"t":"vm+","name":"a","qmp":"/x"}').replace(b'"a"', b'"b"'),
     "line 1: checksum mismatch"),
    (line(b'{"t":"vm+","name":"\xff\xfe","qmp":"/x"}'), "line 1: not UTF-8"),
    (line(b'{"t":"vm+","name":["web1"],"qmp":"/x"}'), "line 1: vm+.name: Input should be"),
    (line(b'{"t":"nonsense"}'), "line 1: "),
    (line(b'[1,2,3]'), "line 1: "),
])
def test_damaged_journal_is_refused_naming_file_and_line(tmp_path: Path, content: bytes,
                                                         cause: str) -> None:
    (tmp_path / "journal.log").write_bytes(content)
    with pytest.raises(JournalDamaged) as err:
        Journal.open(tmp_path)
    assert str(tmp_path / "journal.log") in str(err.value) and cause in str(err.value)


@pytest.mark.parametrize("tail", [
    b"\x00" * 4096,                              # the file grew, its last blocks never written
    b"\x00" * 100 + b"\n" + b"\x00" * 50,         # ... across what would have been lines
    b"0123abcd {\"t\":\"vm+\"" + b"\x00" * 300,    # a record cut short, then zeros
])
async def test_nul_bytes_a_power_loss_left_are_a_torn_tail(tmp_path: Path, tail: bytes) -> None:
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/x")
    j.close()
    path = tmp_path / "journal.log"
    good = path.read_bytes()
    path.write_bytes(good + tail)
    again = Journal.open(tmp_path)
    assert again.vms == {"vm1": "/x"}
    assert path.read_bytes() == good, "the zeros are cut off before new appends"
    again.close()
    if not tail.strip(b"\x00\n"):
        (tmp_path / "journal.log").write_bytes(tail)
        assert Journal.open(tmp_path).vms == {}    # nothing but zeros: nothing was kept


def test_zeros_before_a_good_record_are_damage(tmp_path: Path) -> None:
    good = line(b'{"t":"vm+","name":"a","qmp":"/x"}')
    (tmp_path / "journal.log").write_bytes(good + b"\x00" * 20 + b"\n" + good)
    with pytest.raises(JournalDamaged, match="line 2"):
        Journal.open(tmp_path)


def test_damage_before_the_last_line_is_not_taken_for_a_torn_tail(tmp_path: Path) -> None:
    good = line(b'{"t":"vm+","name":"a","qmp":"/x"}')
    (tmp_path / "journal.log").write_bytes(good + b"0000 broken\n" + good)
    with pytest.raises(JournalDamaged, match="line 2"):
        Journal.open(tmp_path)


def test_state_json_of_format_1_is_migrated(tmp_path: Path) -> None:
    o = op()
    (tmp_path / "state.json").write_text(json.dumps({
        "format": 1, "vms": {"vm1": "/x"}, "host": {},
        "pending": {}, "operations": [o.record().model_dump()]}))
    j = Journal.open(tmp_path)
    assert j.vms == {"vm1": "/x"} and list(j.ops) == [o.id]
    assert not (tmp_path / "state.json").exists() and (tmp_path / "state.json.migrated").exists()


def test_state_json_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"vms": ["web1"]}')
    with pytest.raises(JournalDamaged, match=r"state\.json"):
        Journal.open(tmp_path)


async def test_compaction_keeps_state_and_shrinks_the_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(log_mod, "COMPACT_AFTER", 50)
    j = Journal.open(tmp_path)
    await j.vm_added("keep", "/k")
    for i in range(60):
        o = await j.begin(op())
        j.end(o)
        await j.vm_added(f"vm{i}", "/x")
        await j.vm_removed(f"vm{i}")
    kept = await j.begin(Operation("detach", "keep", "pci.0", 5, {"f0": 0}, "acpi-pcihp"))
    again = await reopened(tmp_path, j)
    assert again.vms == {"keep": "/k"} and list(again.ops) == [kept.id]
    assert len((tmp_path / "journal.log").read_bytes().splitlines()) < 60


def test_files_are_private(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    assert stat.S_IMODE((tmp_path / "journal.log").stat().st_mode) == 0o600
    j.close()


async def test_the_disk_is_never_waited_for_on_the_event_loop_and_syncs_are_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write and sync runs on the journal's own thread: while a sync stalls, the loop
    goes on (a ticker keeps ticking); the durable records submitted meanwhile, for different
    VMs, share the next sync (group commit)."""
    import threading
    import time

    j = Journal.open(tmp_path)
    threads: list[str] = []
    stall = threading.Event()

    def sync(fd: int) -> None:
        threads.append(threading.current_thread().name)
        stall.wait(10)

    monkeypatch.setattr(log_mod.os, "fdatasync", sync)
    first = asyncio.create_task(j.vm_added("first", "/a"))
    ticks = 0
    for _ in range(20):
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks == 20 and not first.done()          # the loop ran; the sync still waits
    others = [asyncio.create_task(j.vm_added(f"vm{i}", f"/{i}")) for i in range(10)]
    await asyncio.sleep(0.05)
    stall.set()
    await asyncio.wait_for(asyncio.gather(first, *others), 10)
    assert threading.main_thread().name not in threads
    assert j.syncs == 2, "the ten records submitted during the first sync share one"
    started = time.monotonic()
    await j.vm_added("last", "/z")
    assert time.monotonic() - started < 10
    assert set((await reopened(tmp_path, j)).vms) == {"first", "last"} | {
        f"vm{i}" for i in range(10)}


async def test_a_journal_removed_or_replaced_under_the_daemon_refuses_changes(
        tmp_path: Path) -> None:
    """The state directory deleted (or the journal replaced) while qmpfd runs: no change is
    accepted into a file nobody will read back, and the reason names the file."""
    j = Journal.open(tmp_path)
    await j.vm_added("vm1", "/x")
    assert j.problem() is None
    path = tmp_path / "journal.log"
    path.rename(tmp_path / "elsewhere.log")
    path.write_bytes(b"")                              # another file where it was
    assert j.problem() is not None and "replaced" in j.problem()  # type: ignore[operator]
    with pytest.raises(StateWriteError, match="replaced by another file"):
        await j.begin(op())
    assert j.ops == {}
    path.unlink()
    assert "was removed" in (j.problem() or "")
    with pytest.raises(StateWriteError, match="was removed"):
        await j.vm_added("vm2", "/y")
    assert j.vms == {"vm1": "/x"}


OP = {"kind": "attach", "vm": "ghost", "bus": "pci.0", "slot": 5, "functions": {"a": 0},
      "policy": "acpi-pcihp", "id": "op-1", "started": 1.0}


@pytest.mark.parametrize("lines, cause", [
    ([{"t": "op+", "op": OP}], "line 1: operation op-1 is on VM 'ghost', which the journal "
                               "does not list"),
    ([{"t": "vm+", "name": "v", "qmp": "/x"},
      {"t": "op+", "op": {**OP, "vm": "v", "slot": 99}}], "line 2: op+.op.slot"),
    ([{"t": "vm+", "name": "v", "qmp": "/x"},
      {"t": "op+", "op": {**OP, "vm": "v", "functions": {"a": 9}}}], "line 2: op+.op.functions"),
    ([{"t": "vm+", "name": "v", "qmp": "/x"},
      {"t": "queue+", "vm": "w", "queue": {"bus": "pci.0", "slot": 3}}],
     "line 2: functions are queued for VM 'w'"),
])
def test_records_that_are_valid_alone_but_wrong_together_are_refused(
        tmp_path: Path, lines: list[dict[str, object]], cause: str) -> None:
    """A ghost operation (its VM not listed) or a slot no PCI bus has would live forever in
    query-operations: refused at start, naming the file, the line and the cause."""
    (tmp_path / "journal.log").write_bytes(
        b"".join(line(json.dumps(rec, separators=(",", ":")).encode()) for rec in lines))
    with pytest.raises(JournalDamaged) as err:
        Journal.open(tmp_path)
    assert str(tmp_path / "journal.log") in str(err.value) and cause in str(err.value)


async def test_the_file_stays_bounded_by_live_state_not_by_bytes_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queues of large functions saved and cancelled over and over leave nothing live: the
    file is compacted by bytes as well as by records (it grew to hundreds of MB before)."""
    monkeypatch.setattr(log_mod, "COMPACT_BYTES", 1 << 20)
    j = Journal.open(tmp_path)
    await j.vm_added("v", "/x")
    big = {"bus": "pci.0", "slot": 3, "expires": 1e12, "created": 1.0,
           "functions": [{"id": "q1", "driver": "e1000", "function": 1,
                          "properties": {"romfile": "x" * 256_000}}]}
    for _ in range(40):                                   # 10 MB written in all
        await j.queue_saved("v", big)
        await j.queue_cancelled("v", "pci.0", 3)
    await j.drain()
    assert (tmp_path / "journal.log").stat().st_size < 2 << 20
    again = await reopened(tmp_path, j)
    assert again.vms == {"v": "/x"} and again.pending == {}


def test_identity_problem_names_a_removed_or_replaced_journal(tmp_path: Path) -> None:
    from qmpfd.state.logfile import file_identity, identity_problem
    path = tmp_path / "journal.log"
    path.write_bytes(b"")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        held = {file_identity(fd)}
        assert identity_problem(path, held) is None
        (tmp_path / "other").write_bytes(b"")
        other = os.open(tmp_path / "other", os.O_RDONLY)
        os.replace(tmp_path / "other", path)          # another file at the same name
        assert "was replaced by another file" in str(identity_problem(path, held))
        assert identity_problem(path, held | {file_identity(other)}) is None  # a swap of ours
        os.close(other)
        path.unlink()
        assert "was removed while qmpfd ran" in str(identity_problem(path, held))
        (tmp_path / "plain").write_bytes(b"")
        assert "cannot be examined" in str(identity_problem(tmp_path / "plain" / "x", held))
        (tmp_path / "again").write_bytes(b"")
        assert identity_problem(tmp_path / "again", ()) is None   # nothing to compare with
    finally:
        os.close(fd)


async def test_checking_the_journal_is_one_stat_per_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted: a record written behind its request checks the file with one ``stat`` of its
    name and no ``fstat`` (the file held is known; it changes only by compaction, which says
    so), and compaction's own swap never reads as a replacement."""
    j = Journal.open(tmp_path)
    calls: list[str] = []
    real_stat, real_fstat = os.stat, os.fstat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append("stat") or real_stat(*a, **k))
    monkeypatch.setattr(os, "fstat", lambda *a, **k: calls.append("fstat") or real_fstat(*a, **k))
    await j.begin(Operation("attach", "v", "pci.0", 3, {"a": 0}, "acpi", durable=False))
    assert calls == ["stat"]
    monkeypatch.setattr(os, "stat", real_stat)
    monkeypatch.setattr(os, "fstat", real_fstat)
    j._log._compact(b"")            # a new file swapped in under the same name
    assert j.problem() is None
    await j.drain()
    j.close()


async def test_a_record_written_behind_is_encoded_off_the_requests_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-function attach's begin and end records are encoded when their batch is written
    (counted), not while the request runs; the begin record says what the operation was when
    it began (``sent`` changed later is the next record's, not the begin's)."""
    from qmpfd.state import journal as journal_mod
    encoded: list[str] = []
    real = journal_mod.r.encode

    def counting(rec: object) -> bytes:
        encoded.append(type(rec).__name__)
        return real(rec)  # type: ignore[arg-type]
    monkeypatch.setattr(journal_mod.r, "encode", counting)
    j = Journal.open(tmp_path)
    one = Operation("attach", "vm1", "pci.0", 5, {"f0": 0}, "acpi-pcihp", durable=False)
    await j.begin(one)
    one.sent = True                      # as if a rollback had sent device_del since
    j.end(one)
    assert encoded == [], "nothing encoded on the request's path"
    await j.drain()
    assert encoded == ["OpBegun", "OpEnded"]
    begun = next(json.loads(ln.split(b" ", 1)[1]) for ln in
                 (tmp_path / "journal.log").read_bytes().splitlines() if b'"op+"' in ln)
    assert begun["op"]["sent"] is False


async def test_a_durable_record_costs_no_task_and_one_answer_from_the_thread(
        tmp_path: Path) -> None:
    """Counted: a durable begin (2+ functions) hands its batch to the writer thread and the
    thread answers with one callback on the loop; no task is made (the writer task and its
    future chained across threads were two loop turns on every multifunction attach). Records
    submitted while it is on the thread go together in the next batch (group commit)."""
    j = Journal.open(tmp_path)
    loop = asyncio.get_running_loop()
    made: list[object] = []
    factory = loop.get_task_factory()
    loop.set_task_factory(lambda lp, coro, **kw: made.append(coro) or asyncio.Task(
        coro, loop=lp, **kw))
    answers: list[object] = []
    real = loop.call_soon_threadsafe

    def spy(callback: object, *args: object, **kw: object) -> object:
        answers.append(callback)
        return real(callback, *args, **kw)  # type: ignore[arg-type]
    loop.call_soon_threadsafe = spy  # type: ignore[method-assign]
    try:
        await j.begin(op(n=2))
    finally:
        loop.set_task_factory(factory)
        del loop.call_soon_threadsafe
    assert made == [], "no task for a durable record"
    assert len(answers) == 1, "one callback from the thread"
    writes, syncs = j._log.writes, j.syncs
    await asyncio.gather(j.begin(op(n=2)), j.begin(op(n=3)), j.begin(op(n=2)))
    assert j.syncs - syncs <= 2 and j._log.writes - writes <= 2, "the later two share a write"
    assert len(j.ops) == 4
