"""Reading the append-only log back: every record, with a torn tail (a crash mid-write, or the
zeros a power loss leaves) told apart from damage. Pure apart from reading the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qmpfd.state.records import BadLine, Record, decode


class JournalDamaged(Exception):
    """The journal holds a damaged record before its last line: qmpfd will not guess."""

    def __init__(self, path: Path, line: int, cause: str) -> None:
        super().__init__(f"journal {path} line {line}: {cause}")
        self.path, self.line, self.cause = path, line, cause


@dataclass
class LoadResult:
    records: list[Record]
    size: int                 # bytes of good records (the file is cut to this)
    torn: bool = False        # a torn last record was dropped
    count: int = 0


def read_log(path: Path) -> LoadResult:
    """Every record of the file. A torn last record (a crash mid-write: the start of a record
    with no newline, or NUL bytes a power loss left) is dropped; any other bad line raises
    :class:`JournalDamaged`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadResult([], 0)
    lines = data.split(b"\n")
    tail = lines.pop()          # bytes after the last newline: b"" unless a write was cut short
    # A power loss can leave the file longer than what reached the disk, the rest zeros: lines
    # of NUL bytes at the end are part of the torn tail.
    while lines and lines[-1] and not lines[-1].strip(b"\0"):
        tail = lines.pop() + b"\n" + tail
    records: list[Record] = []
    size = 0
    for n, line in enumerate(lines, 1):
        try:
            records.append(decode(line))
        except BadLine as exc:
            raise JournalDamaged(path, n, exc.cause) from None
        size += len(line) + 1
    cut = tail.rstrip(b"\0\n")
    if cut and (b"\n" in cut or not _torn_prefix(cut)):
        raise JournalDamaged(path, len(lines) + 1, "not a journal record")
    return LoadResult(records, size, torn=bool(tail), count=len(records))


def _torn_prefix(tail: bytes) -> bool:
    """Whether bytes after the last newline look like the start of a record cut short by a
    crash (``CRC32 {...``), rather than something else written into the file."""
    head = tail[:8]
    if any(c not in b"0123456789abcdef" for c in head):
        return False
    rest = tail[8:]
    return not rest or rest[:2] in (b" ", b" {")
