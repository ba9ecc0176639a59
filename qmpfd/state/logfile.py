"""The journal file itself: whether the file a daemon appends to is still the one at its path,
and a directory's sync (a rename made durable)."""

from __future__ import annotations

import os
from pathlib import Path


def identity_problem(path: Path, fd: int) -> str | None:
    """Why the file open for appending (``fd``) is no longer the journal at ``path`` (its
    state directory deleted, or the file replaced, under the running daemon); None if it is.
    Writing on would record state nobody will ever read back."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return (f"{path} was removed while qmpfd ran (its state directory deleted?); "
                "qmpfd refuses changes until it is restarted")
    except OSError as exc:
        return f"{path} cannot be examined: {exc.strerror or exc}"
    try:    # the writer thread may be swapping the file in (compaction) right now
        held = os.fstat(fd) if fd >= 0 else None
    except OSError:
        held = None
    if held is not None and (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
        return (f"{path} was replaced by another file while qmpfd ran; qmpfd refuses "
                "changes until it is restarted")
    return None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
