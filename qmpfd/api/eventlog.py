"""Events a management plane can trust: every event carries this daemon run's ``boot`` id and a
``seq`` number (1, 2, 3, ... per run), and the last N are kept in a ring that ``query-events
{since}`` replays. A client that reconnects asks for everything after the last ``seq`` it saw; the
reply says ``complete: false`` (and why) when the ring no longer holds all of it or qmpfd was
restarted in between, so the client knows to re-read the state instead of trusting a gap.
"""

from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass
from typing import Any

from qmpfd.api import wire


@dataclass(frozen=True)
class Replay:
    boot: str
    last: int                        # the newest seq issued (0: none yet)
    events: list[wire.Message]
    complete: bool
    reason: str | None = None


class EventLog:
    def __init__(self, size: int) -> None:
        self.boot = uuid.uuid4().hex
        self.size = size
        self._seq = 0
        self._ring: collections.deque[wire.Message] = collections.deque(maxlen=size)

    def record(self, name: str, data: dict[str, Any]) -> wire.Message:
        """The event as sent: the domain's data plus ``seq`` and ``boot``."""
        self._seq += 1
        msg = wire.event(name, {**data, "seq": self._seq, "boot": self.boot})
        self._ring.append(msg)
        return msg

    def replay(self, since: int | None, boot: str | None) -> Replay:
        oldest = int(self._ring[0]["data"]["seq"]) if self._ring else self._seq + 1
        if boot is not None and boot != self.boot:
            return Replay(self.boot, self._seq, list(self._ring), False,
                          f"qmpfd restarted (boot {boot} is over; this is {self.boot}): events "
                          "of the earlier run are gone; re-read query-vms, query-slots and "
                          "query-operations")
        after = 0 if since is None else since
        if after > self._seq:
            return Replay(self.boot, self._seq, list(self._ring), False,
                          f"seq {after} was never issued by this run of qmpfd (boot "
                          f"{self.boot}, newest seq {self._seq}): it belongs to an earlier run; "
                          "re-read query-vms, query-slots and query-operations")
        events = [m for m in self._ring if int(m["data"]["seq"]) > after]
        if after + 1 < oldest:
            return Replay(self.boot, self._seq, events, False,
                          f"events {after + 1}-{oldest - 1} are no longer kept (the ring holds "
                          f"the last {self.size}; config daemon.event-ring)")
        return Replay(self.boot, self._seq, events, True)
