"""Fault points for fault-injection tests. Inert unless their environment variables are set.

The variables are read once, when the daemon starts (:func:`read_environment`).

- ``QMPFD_CRASH_AT=<point>``: the daemon SIGKILLs itself on reaching that point, so a test can
  stop it exactly between two QMP commands.
- ``QMPFD_PAUSE_AT=<point>`` (with ``QMPFD_PAUSE_SECONDS``, default 3): the operation waits there,
  so a test can kill QEMU or cut the QMP socket mid-operation. With ``QMPFD_PAUSE_MARK=<file>``
  the daemon creates that file on arriving, and the pause ends when the test removes it (or
  the seconds run out): a test acts at the point itself instead of guessing with a sleep.

Points: ``attach-begin``, ``attach-step-N`` (after the N-th device_add was accepted),
``attach-ended`` (the end record submitted, the reply not sent),
``detach-recording`` (the slot claimed, its record not yet written), ``detach-begin``
(journaled, nothing sent), ``detach-sent`` (device_del accepted).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

_crash_at: str | None = None
_pause_at: str | None = None


def read_environment() -> None:
    """Take the fault points from the environment: once, at import (a point on a request's
    path then costs a comparison, not two lookups in ``os.environ``); again after a test
    changes the environment in-process."""
    global _crash_at, _pause_at
    _crash_at = os.environ.get("QMPFD_CRASH_AT")
    _pause_at = os.environ.get("QMPFD_PAUSE_AT")


read_environment()


async def fault_point(name: str) -> None:
    if name == _crash_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == _pause_at:
        await _pause(float(os.environ.get("QMPFD_PAUSE_SECONDS", "3")),
                     os.environ.get("QMPFD_PAUSE_MARK"))


async def _pause(seconds: float, mark: str | None) -> None:
    if not mark:
        await asyncio.sleep(seconds)
        return
    path = Path(mark)
    path.touch()
    for _ in range(int(seconds / 0.02)):   # the test removes the mark to go on
        if not path.exists():
            return
        await asyncio.sleep(0.02)
