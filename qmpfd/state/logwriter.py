"""The writer thread's side of the journal's :class:`~qmpfd.state.log.AppendLog`: the open file,
its size and identity, and every write, ``fdatasync``, retry and compaction, all on one thread
of its own (never on the event loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from qmpfd.metrics import JOURNAL_SYNC_SECONDS, JOURNAL_WRITE_FAILURES
from qmpfd.state.logfile import FileIdentity, identity_problem, swap_in

log = logging.getLogger("qmpfd.state")

RETRY_DELAY = 1.0         # seconds between attempts to write settle records after a failure
FILE_MODE = 0o600


class LogWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._path = str(path)          # stat'ed per request: no Path conversion each time
        self._fd = -1
        #: the identity of the file ``_fd`` holds (two while compaction swaps a new one in)
        self._held: frozenset[FileIdentity] = frozenset()
        self._size = 0
        self._since_snapshot = 0
        self._snapshot_bytes = 0    # the file's size after the last compaction (0: none yet)
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

    def _write_in_order(self, data: bytes, sync: bool) -> None:
        """Records not yet written after a failure go first: nothing overtakes them."""
        try:
            self._write(self._unwritten + data, sync)
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            raise
        self._unwritten = b""
        self.last_error = None

    def _write_answered(self, data: bytes, sync: bool, loop: asyncio.AbstractEventLoop,
                        answer: Callable[[OSError | None], None]) -> None:
        """Write, then ``answer`` on the loop (one callback: no future chained across)."""
        error: OSError | None = None
        try:
            self._write_in_order(data, sync)
        except OSError as exc:
            error = exc
        loop.call_soon_threadsafe(answer, error)

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
        """In a thread: a fresh file holding one snapshot record, swapped in atomically (the
        log goes on as it was if that fails)."""
        try:
            self._swap_in(snapshot)
        except OSError as exc:
            log.warning("journal compaction failed", extra={"path": str(self.path),
                                                           "error": str(exc)})

    def _swap_in(self, snapshot: bytes) -> None:
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
