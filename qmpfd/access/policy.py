"""Decisions about peers and paths. Name lookups happen once, at start; checks are pure."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from qmpfd.access.peer import Peer
from qmpfd.config import AccessConfig
from qmpfd.errors import InvalidRequest

log = logging.getLogger("qmpfd.access")


def _uid(user: str | int) -> int | None:
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        log.warning("access.users: no such user", extra={"user": user})
        return None


def _gid(group: str | int) -> int | None:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("access.groups: no such group (nobody is admitted by it)",
                 extra={"group": group})
        return None


def supplementary_groups(uid: int, gid: int) -> set[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return set(os.getgrouplist(name, gid))


@dataclass(frozen=True)
class AccessPolicy:
    uids: frozenset[int]
    gids: frozenset[int]
    qmp_dirs: tuple[Path, ...]
    passthrough: bool

    @classmethod
    def from_config(cls, cfg: AccessConfig) -> AccessPolicy:
        uids = {u for u in map(_uid, cfg.users) if u is not None}
        uids.add(os.getuid())  # whoever runs qmpfd may always talk to it
        gids = {g for g in map(_gid, cfg.groups) if g is not None}
        dirs = tuple(Path(os.path.realpath(d)) for d in cfg.qmp_dirs)
        return cls(frozenset(uids), frozenset(gids), dirs, cfg.qmp_passthrough)

    def admit(self, peer: Peer) -> str | None:
        """None if the peer may use the API, else the reason it may not."""
        if peer.uid is None or peer.gid is None:
            return "access denied: the peer's credentials cannot be read"
        if peer.uid in self.uids or peer.gid in self.gids:
            return None
        if self.gids & supplementary_groups(peer.uid, peer.gid):
            return None
        return (f"access denied: uid {peer.uid} is neither an allowed user nor in an allowed "
                "group (access.users, access.groups)")

    def check_qmp_path(self, path: Path) -> Path:
        """The resolved socket path, if it lies below an allowed directory."""
        resolved = Path(os.path.realpath(path))
        if not path.is_absolute():
            raise InvalidRequest(f"qmp: '{path}' must be an absolute path")
        if not any(resolved.is_relative_to(d) for d in self.qmp_dirs):
            allowed = ", ".join(str(d) for d in self.qmp_dirs) or "none"
            raise InvalidRequest(f"qmp: {resolved} is outside the allowed QMP directories "
                                 f"({allowed}; config access.qmp-dirs)")
        return resolved
