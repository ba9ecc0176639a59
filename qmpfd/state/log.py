"""An append-only file of records, group-committed with ``fdatasync``.

Why a log and not a document rewritten per change: appending one line and ``fdatasync`` costs a
tenth of write-temp/fsync/rename/fsync-dir, and concurrent changes share one sync.

Two kinds of write:

- :meth:`AppendLog.commit`: durable. The caller returns once the record is on disk, and the
  in-memory change it describes (``apply``) is made only then, by the writer, in log order. If
  the write fails the file is cut back to where it was, ``apply`` never runs and the caller gets
  :class:`StateWriteError` naming the file and the cause: nothing changed.
- :meth:`AppendLog.settle`: a record confirming what QEMU or the host already did (an operation
  ended, a function given back, or an operation whose record need not be durable). Not waited
  for, never an error to the client: a failure is logged and the record stays first in line
  until a write succeeds. Unless it asks for a sync, it waits up to :data:`LAZY_WRITE_DELAY` for
  others to share its write, and it is encoded only then (off the request's path). A batch of
  nothing but such records goes to the writer thread without a reply to the event loop.

The file is written by a thread of its own (:mod:`qmpfd.state.logwriter`), never on the event
loop: while it waits for the disk (an ``fdatasync`` takes 0.1-1.5 ms here, seconds on a stalling
disk) every VM's requests, events and replies go on. Records reach the file in the order they
were submitted: one batch at a time, and a batch is everything submitted while the previous one
was being written (group commit: one ``fdatasync`` serves every durable record of the batch,
whichever VMs they are for). A batch is handed to the thread by a plain submit and answered by
one callback on the loop: no task, no future chained across the threads (each was a loop turn
inside a multifunction attach's wait for its record). Compaction (a snapshot record in a fresh
file, swapped in with rename) is queued on the same thread behind the batch that made it due,
never inside a request's wait for its own batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmpfd.errors import QmpfdError
from qmpfd.metrics import JOURNAL_WRITE_FAILURES
from qmpfd.state.logfile import file_identity
from qmpfd.state.logread import JournalDamaged as JournalDamaged
from qmpfd.state.logread import read_log
from qmpfd.state.logwriter import FILE_MODE, LogWriter
from qmpfd.state.records import Record

log = logging.getLogger("qmpfd.state")

COMPACT_AFTER = 4096      # records since the last snapshot before the log is compacted
COMPACT_BYTES = 4 << 20   # ... or bytes since it (big queued records cancelled leave nothing)
#: seconds an unsynced record waits for others to share its write (one hand-off to the writer
#: thread per batch: the records of an operation's steps, milliseconds apart, go together)
LAZY_WRITE_DELAY = 0.01


class StateWriteError(QmpfdError):
    """The state file could not be written; the request changed nothing."""


@dataclass
class _Entry:
    #: the record's line, or what makes it (a settle record: encoded when its batch is written)
    data: bytes | Callable[[], bytes]
    sync: bool
    apply: Callable[[], None] | None = None
    done: asyncio.Future[None] | None = None
    settle: bool = False

    def line(self) -> bytes:
        if not isinstance(self.data, bytes):
            self.data = self.data()
        return self.data


def _nothing() -> None:
    pass


class AppendLog(LogWriter):
    """The event loop's side: records queued, batched and handed to the writer thread
    (:class:`~qmpfd.state.logwriter.LogWriter`), their callers answered."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._queue: list[_Entry] = []
        #: a batch someone waits for is on the thread (the next batch waits for its answer)
        self._in_flight = False
        self._lazy: asyncio.TimerHandle | None = None   # a batch of unsynced records waiting
        self.snapshot: Callable[[], bytes] | None = None   # set by the journal

    def open(self) -> list[Record]:
        loaded = read_log(self.path)
        if loaded.torn:
            log.warning("journal: torn last record dropped (a crash mid-write)",
                        extra={"path": str(self.path)})
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           FILE_MODE)
        os.fchmod(self._fd, FILE_MODE)
        self._held = frozenset({file_identity(self._fd)})
        if loaded.torn or os.fstat(self._fd).st_size != loaded.size:
            os.ftruncate(self._fd, loaded.size)
            os.fsync(self._fd)
        self._size = loaded.size
        self._since_snapshot = loaded.count
        return loaded.records

    async def commit(self, data: bytes, apply: Callable[[], None]) -> None:
        """Append durably; run ``apply`` once it is on disk; raise StateWriteError if not."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submit(_Entry(data, True, apply, fut))
        await fut

    def settle(self, data: bytes | Callable[[], bytes], *, sync: bool = False) -> None:
        """Append when possible; never fails the caller (see the module docstring)."""
        self._submit(_Entry(data, sync, settle=True))

    async def drain(self) -> None:
        """Wait until everything submitted so far has been attempted (shutdown, tests)."""
        loop = asyncio.get_running_loop()
        self._start()
        while True:
            # The thread runs jobs in order, and a batch's answer is queued on the loop before
            # this job's: once it returns, every batch before it was answered.
            await loop.run_in_executor(self._thread, _nothing)
            if not self._in_flight and not self._queue:
                return
            self._start()

    def _submit(self, entry: _Entry) -> None:
        """Queue a record. A durable one goes to the thread at once; an unsynced one waits
        :data:`LAZY_WRITE_DELAY` for company. While a batch someone waits for is on the thread,
        every record waits for its answer and goes in the next batch (group commit)."""
        self._queue.append(entry)
        if self._in_flight:
            return
        if entry.sync or entry.done is not None:
            self._start()
        elif self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(LAZY_WRITE_DELAY, self._start)

    def _start(self) -> None:
        """Hand everything queued to the writer thread as one batch (on the loop). No task and
        no future chained across threads: the thread answers with one callback on the loop."""
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if self._in_flight or not self._queue:
            return
        loop = asyncio.get_running_loop()
        batch, self._queue = self._queue, []
        data = b"".join(e.line() for e in batch)
        sync = any(e.sync for e in batch)
        if all(e.done is None and e.apply is None for e in batch):
            # Nobody waits for these records and nothing in memory waits for them: the
            # thread writes them in submission order and keeps them for a retry if the
            # write fails. Nothing comes back to the loop (no wake-up per batch).
            self._thread.submit(self._write_settled, data, sync, loop)
            self._written_count(len(batch))
            return
        self._in_flight = True
        self._thread.submit(self._write_answered, data, sync, loop,
                            functools.partial(self._answered, batch))

    def _answered(self, batch: list[_Entry], error: OSError | None) -> None:
        """On the loop: the thread wrote ``batch`` (or failed to). Apply and wake its callers,
        then hand over what queued meanwhile."""
        self._in_flight = False
        if error is not None:
            self._failed(batch, error)
        else:
            for e in batch:
                if e.apply is not None:
                    e.apply()
                if e.done is not None and not e.done.done():
                    e.done.set_result(None)
            self._written_count(len(batch))
        self._start()

    def _written_count(self, records: int) -> None:
        """Compaction once enough was written since the last snapshot: queued on the thread
        behind the batches before it, taken from the in-memory state on the loop now."""
        self._since_snapshot += records
        grown = self._size - self._snapshot_bytes
        if (self._since_snapshot >= COMPACT_AFTER or grown >= COMPACT_BYTES) \
                and self.snapshot is not None:
            self._since_snapshot = 0
            self._snapshot_bytes = self._size
            self._thread.submit(self._compact, self.snapshot())

    def _failed(self, batch: list[_Entry], exc: OSError) -> None:
        """A batch with durable records failed: each of them fails its caller; its settle
        records are kept for the next write (first in line)."""
        JOURNAL_WRITE_FAILURES.inc()
        error = StateWriteError(f"state file {self.path}: cannot write: "
                                f"{exc.strerror or exc}; nothing was changed")
        for e in batch:
            if e.done is not None and not e.done.done():
                e.done.set_exception(error)
        retry = b"".join(e.line() for e in batch if e.settle)
        if retry:
            log.error("journal write failed; will retry", extra={"path": str(self.path),
                                                                 "error": str(exc)})
            self._thread.submit(self._write_settled, retry, False, asyncio.get_running_loop())

    def check_writable(self) -> None:
        """Raise StateWriteError if the file is known not to take records any more (the last
        write failed, or the file was removed or replaced): for a record written behind its
        request, which cannot fail the request later."""
        problem = self.identity_problem() or self.last_error
        if problem is not None:
            raise StateWriteError(f"state file {self.path}: cannot write: {problem}; "
                                  "nothing was changed")
