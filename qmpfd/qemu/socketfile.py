"""Whether a QMP socket's path can be trusted to name the socket qmpfd checked (pure but for one
``lstat``): used when a VM is adopted (qmpfd.access.policy) and at every connection."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path


def socket_identity_problem(path: Path) -> str | None:
    """Why ``path`` cannot be trusted to be the socket it names (None: it can, or it does not
    exist yet). A directory check judges a name; a hard link gives a socket that lives
    elsewhere a second name inside an allowed directory, so a socket with more than one link
    is refused, as is anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be examined: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return "is not a socket"
    if st.st_nlink > 1:
        return (f"has {st.st_nlink} hard links: the socket it names may live outside the "
                "allowed QMP directories (give QEMU's own socket path)")
    return None


def listener_pid(path: Path) -> int | None:
    """The pid of the process listening on the Unix socket ``path`` (SO_PEERCRED, known on
    Linux from the moment a connection is queued, before anyone accepts it); None if it cannot
    be told. Two names of one QEMU (its two QMP monitors) give the same pid."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid = int(struct.unpack("3i", raw)[0])
    return pid if pid > 0 else None


def nothing_listens(path: Path, timeout: float) -> bool:
    """True only when nothing can be listening on the Unix socket ``path``: the file is gone
    or refuses connections. Any doubt (a connect that times out, a full accept queue: a busy
    or hung server) is False: whoever owns that socket is alive."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
    return False
