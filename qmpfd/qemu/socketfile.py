"""Whether a QMP socket's path can be trusted to name the socket qmpfd checked (pure but for one
``lstat``): used when a VM is adopted (qmpfd.access.policy) and at every connection."""

from __future__ import annotations

import os
import stat
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
