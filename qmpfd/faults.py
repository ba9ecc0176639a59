"""Fault points for fault-injection tests. Inert unless their environment variables are set.

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


async def fault_point(name: str) -> None:
    if os.environ.get("QMPFD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("QMPFD_PAUSE_AT") == name:
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
