"""One daemon per state directory: an exclusive ``flock`` held for the daemon's life.

Two daemons on one journal would each believe their own memory and write over each other; the
second one must stop before it reads anything, and say which process holds the directory.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from qmpfd.errors import QmpfdError

LOCK_NAME = "lock"


class StateDirBusy(QmpfdError):
    """The state directory cannot be had: another qmpfd holds it, or it cannot be written."""


def prepare_state_dir(directory: Path) -> None:
    """Create the state directory 0700 (journal and audit log are not for other users)."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise StateDirBusy(f"state directory {directory} is not usable: {exc.strerror}") from None


def lock_state_dir(directory: Path) -> int:
    """Take the lock or raise :class:`StateDirBusy`; returns the fd to keep open."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirBusy(f"state directory {directory} is not usable: cannot open {path}: "
                           f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(f"state directory {directory} is in use by another qmpfd "
                           f"(pid {holder}); stop it first or give --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
