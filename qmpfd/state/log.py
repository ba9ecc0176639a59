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

The file is written by a thread of its own, never on the event loop: while it waits for the disk
(an ``fdatasync`` takes 0.1-1.5 ms here, seconds on a stalling disk) every VM's requests, events
and replies go on. Records reach the file in the order they were submitted: one batch at a time,
and a batch is everything submitted while the previous one was being written (group commit: one
``fdatasync`` serves every durable record of the batch, whichever VMs they are for). Compaction
(a snapshot record in a fresh file, swapped in with rename) runs on the same thread between
batches, after a batch has been answered, never inside a request's wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmpfd.errors import QmpfdError
from qmpfd.metrics import JOURNAL_SYNC_SECONDS, JOURNAL_WRITE_FAILURES
from qmpfd.state.logfile import FileIdentity, file_identity, identity_problem, swap_in
from qmpfd.state.logread import JournalDamaged as JournalDamaged
from qmpfd.state.logread import read_log
from qmpfd.state.records import Record

log = logging.getLogger("qmpfd.state")

RETRY_DELAY = 1.0         # seconds between attempts to write settle records after a failure
COMPACT_AFTER = 4096      # records since the last snapshot before the log is compacted
COMPACT_BYTES = 4 << 20   # ... or bytes since it (big queued records cancelled leave nothing)
FILE_MODE = 0o600
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


class AppendLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._path = str(path)          # stat'ed per request: no Path conversion each time
        self._fd = -1
        #: the identity of the file ``_fd`` holds (two while compaction swaps a new one in)
        self._held: frozenset[FileIdentity] = frozenset()
        self._size = 0
        self._queue: list[_Entry] = []
        self._writer: asyncio.Task[None] | None = None
        self._lazy: asyncio.TimerHandle | None = None   # a batch of unsynced records waiting
        self._since_snapshot = 0
        self._snapshot_bytes = 0    # the file's size after the last compaction (0: none yet)
        self.snapshot: Callable[[], bytes] | None = None   # set by the journal
        #: Counters for tests and benchmarks (syncs per operation is asserted, not timed).
        self.syncs = 0
        self.writes = 0
        #: the thread that does every write, sync and compaction of this file
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="journal-writer")
        #: why the last write failed, until one succeeds (query-health)
        self.last_error: str | None = None
        self._lost_reported = False     # the journal vanished or was replaced: logged once
        #: settle records a failed write left, written first by the next write (thread's)
        self._unwritten = b""

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
        self._start()
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        # the records handed to the thread without a reply: written once a job behind them is
        await asyncio.get_running_loop().run_in_executor(self._thread, lambda: None)

    def _submit(self, entry: _Entry) -> None:
        """Queue a record. A durable one starts the writer at once; an unsynced one waits
        :data:`LAZY_WRITE_DELAY` for company, unless the writer is busy anyway."""
        self._queue.append(entry)
        if self._writer is not None and not self._writer.done():
            return                       # the running writer takes it in its next batch
        if entry.sync or entry.done is not None:
            self._start()
        elif self._lazy is None:
            self._lazy = asyncio.get_running_loop().call_later(LAZY_WRITE_DELAY, self._start)

    def _start(self) -> None:
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        if self._queue and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_loop(), name="journal-writer")

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            data = b"".join(e.line() for e in batch)
            sync = any(e.sync for e in batch)
            if all(e.done is None and e.apply is None for e in batch):
                # Nobody waits for these records and nothing in memory waits for them: the
                # thread writes them in submission order and keeps them for a retry if the
                # write fails. Nothing comes back to the loop (no wake-up per batch).
                self._thread.submit(self._write_settled, data, sync, loop)
            else:
                try:
                    await loop.run_in_executor(self._thread, self._write_in_order, data, sync)
                except OSError as exc:
                    self._failed(batch, exc)
                    continue
                for e in batch:
                    if e.apply is not None:
                        e.apply()
                    if e.done is not None and not e.done.done():
                        e.done.set_result(None)
            self._since_snapshot += len(batch)
            grown = self._size - self._snapshot_bytes
            if (self._since_snapshot >= COMPACT_AFTER or grown >= COMPACT_BYTES) \
                    and self.snapshot is not None:
                with contextlib.suppress(OSError):
                    await loop.run_in_executor(self._thread, self._compact, self.snapshot())

    # -- on the writer thread ----------------------------------------------------------------
    def _write_in_order(self, data: bytes, sync: bool) -> None:
        """Records not yet written after a failure go first: nothing overtakes them."""
        try:
            self._write(self._unwritten + data, sync)
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            raise
        self._unwritten = b""
        self.last_error = None

    def _write_settled(self, data: bytes, sync: bool, loop: asyncio.AbstractEventLoop) -> None:
        if not data and not self._unwritten:
            return
        try:
            self._write_in_order(data, sync)
        except OSError as exc:
            first = not self._unwritten
            self._unwritten += data
            JOURNAL_WRITE_FAILURES.inc()
            log.error("journal write failed; will retry", extra={"path": str(self.path),
                                                                 "error": str(exc)})
            if first:
                loop.call_soon_threadsafe(self._retry_later, loop)

    def _retry_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: try the records left unwritten again in :data:`RETRY_DELAY` (and
        then again, until one write succeeds)."""
        def retry() -> None:
            with contextlib.suppress(RuntimeError):     # the journal closed meanwhile
                self._thread.submit(self._retry_unwritten, loop)
        loop.call_later(RETRY_DELAY, retry)

    def _retry_unwritten(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._unwritten:
            return
        try:
            self._write_in_order(b"", False)
        except OSError:
            loop.call_soon_threadsafe(self._retry_later, loop)

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

    def identity_problem(self) -> str | None:
        """:func:`~qmpfd.state.logfile.identity_problem` of this file."""
        return identity_problem(self._path, self._held)

    def _write(self, data: bytes, sync: bool) -> None:
        """Write all of ``data`` or nothing (cut back on any failure)."""
        problem = self.identity_problem()
        if problem is not None:
            if not self._lost_reported:
                self._lost_reported = True
                log.error("journal lost", extra={"path": str(self.path), "error": problem})
            raise OSError(errno.ESTALE, problem)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if sync:
                started = time.monotonic()
                os.fdatasync(self._fd)
                JOURNAL_SYNC_SECONDS.observe(time.monotonic() - started)
                self.syncs += 1
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        self.writes += 1

    def _compact(self, snapshot: bytes) -> None:
        """In a thread: a fresh file holding one snapshot record, swapped in atomically."""
        def swapping(new: FileIdentity) -> None:
            # Either file is this daemon's while the name moves from one to the other (a
            # request checking the journal meanwhile is not refused for its own swap).
            self._held = self._held | {new}
        fd, identity = swap_in(self.path, snapshot, FILE_MODE, swapping)
        os.close(self._fd)
        self._fd = fd
        self._held = frozenset({identity})
        self._size = len(snapshot)
        self._snapshot_bytes = len(snapshot)
        self._unwritten = b""       # what they recorded is in the snapshot
        self._since_snapshot = 1
        log.info("journal compacted", extra={"path": str(self.path)})

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
