"""Who is on the other end of a client connection: identity only, read by the API layer and
judged by :mod:`qmpfd.access.policy`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from SO_PEERCRED (None when the platform cannot tell)."""

    pid: int | None
    uid: int | None
    gid: int | None
