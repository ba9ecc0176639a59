"""Which asyncio event loop the daemon runs on (``[daemon] event-loop``).

uvloop (libuv under asyncio's interface) runs qmpfd's request path with less CPU per loop turn
than the standard loop: an attach is a dozen turns (the request, each QMP command and its
reply, the journal hand-off, the reply), so the loop's own cost is a large part of what qmpfd
adds to QEMU's time (bench/profile.md has the A/B). ``auto`` takes uvloop when it is installed
(a dependency where it ships wheels) and the standard loop otherwise; ``asyncio`` keeps the
standard loop, for a platform where uvloop misbehaves.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Literal

from qmpfd.errors import InvalidRequest

Choice = Literal["auto", "uvloop", "asyncio"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: Choice) -> LoopFactory:
    """The factory for ``asyncio.Runner`` (:func:`running_loop_name` names what it made)."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise InvalidRequest("daemon.event-loop: 'uvloop' is not installed "
                                 "(pip install uvloop, or event-loop = \"auto\")") from None
        return asyncio.new_event_loop
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: what the running loop is (query-health)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"
