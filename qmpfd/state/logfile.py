"""The journal file itself: whether the file a daemon appends to is still the one at its path,
a new file swapped in under its name (compaction), and a directory's sync (a rename made
durable)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

FileIdentity = tuple[int, int]       # (st_dev, st_ino)


def file_identity(fd: int) -> FileIdentity:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def identity_problem(path: str | Path, held: Collection[FileIdentity]) -> str | None:
    """Why the file open for appending (its identity one of ``held``: two while compaction
    swaps a new file in, none to compare with) is no longer the journal at ``path`` (its
    state directory deleted, or the file replaced, under the running daemon); None if it is.
    Writing on would record state nobody will ever read back. One ``stat`` per call: the held
    file's identity is known without asking (it changes only when the daemon swaps it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return (f"{path} was removed while qmpfd ran (its state directory deleted?); "
                "qmpfd refuses changes until it is restarted")
    except OSError as exc:
        return f"{path} cannot be examined: {exc.strerror or exc}"
    if held and (named.st_dev, named.st_ino) not in held:
        return (f"{path} was replaced by another file while qmpfd ran; qmpfd refuses "
                "changes until it is restarted")
    return None


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(path: Path, content: bytes, mode: int,
            swapping: Callable[[FileIdentity], None]) -> tuple[int, FileIdentity]:
    """Replace the file at ``path`` by a new one holding ``content``, durably (written and
    synced under a temporary name, renamed, the directory synced); ``swapping`` learns the new
    file's identity before the rename. Returns the new file open for appending, and its
    identity."""
    tmp = path.with_suffix(".compact")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, content)
        os.fsync(fd)
        identity = file_identity(fd)
    finally:
        os.close(fd)
    swapping(identity)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC), identity
