"""Decisions about peers and paths. Name lookups happen once, at start; checks are pure."""

from __future__ import annotations

import fnmatch
import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from qmpfd.access.peer import Peer
from qmpfd.config import AccessConfig
from qmpfd.errors import InvalidRequest
from qmpfd.qemu.socketfile import socket_identity_problem

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
class Scope:
    """What a tenant peer may touch: the VMs whose names match one rule's patterns."""

    rule: str              # "access.tenants[0] (group tenant-a: a-*, b-*)", for refusals
    patterns: tuple[str, ...]
    qmp_dirs: tuple[Path, ...] = ()      # where its members may adopt QEMU sockets
    sessions: int = 8                    # API sessions its members may hold at once
    requests: int = 16                   # requests its members may have in flight at once

    def allows(self, vm_name: str | None) -> bool:
        return vm_name is not None and any(fnmatch.fnmatchcase(vm_name, p)
                                           for p in self.patterns)

    def refusal(self, what: str) -> str:
        return f"access denied: {what} is outside {self.rule}"


@dataclass(frozen=True)
class AccessPolicy:
    uids: frozenset[int]
    gids: frozenset[int]
    qmp_dirs: tuple[Path, ...]
    passthrough: bool
    tenants: tuple[tuple[int, Scope], ...] = ()     # (gid, scope), in config order

    @classmethod
    def from_config(cls, cfg: AccessConfig) -> AccessPolicy:
        uids = {u for u in map(_uid, cfg.users) if u is not None}
        uids.add(os.getuid())  # whoever runs qmpfd may always talk to it
        gids = {g for g in map(_gid, cfg.groups) if g is not None}
        dirs = tuple(Path(os.path.realpath(d)) for d in cfg.qmp_dirs)
        tenants = []
        for i, rule in enumerate(cfg.tenants):
            gid = _gid(rule.group)
            if gid is not None:
                label = f"access.tenants[{i}] (group {rule.group}: {', '.join(rule.vms)})"
                granted = tuple(Path(os.path.realpath(d)) for d in rule.qmp_dirs)
                tenants.append((gid, Scope(label, tuple(rule.vms), granted, rule.sessions,
                                           rule.requests)))
        return cls(frozenset(uids), frozenset(gids), dirs, cfg.qmp_passthrough, tuple(tenants))

    def _groups(self, peer: Peer) -> set[int]:
        assert peer.uid is not None and peer.gid is not None
        return {peer.gid} | supplementary_groups(peer.uid, peer.gid)

    def scope(self, peer: Peer) -> Scope | None:
        """For a peer :meth:`admit` lets in: None for full access, else the tenant rule that
        limits it. (A peer it does not let in has no scope at all: ask :meth:`admit` first.)"""
        if peer.uid is None or peer.gid is None or peer.uid in self.uids:
            return None
        groups = self._groups(peer)
        if self.gids & groups:
            return None
        return next((scope for gid, scope in self.tenants if gid in groups), None)

    def admit(self, peer: Peer) -> str | None:
        """None if the peer may use the API, else the reason it may not."""
        if peer.uid is None or peer.gid is None:
            return "access denied: the peer's credentials cannot be read"
        if peer.uid in self.uids:
            return None
        groups = self._groups(peer)
        if self.gids & groups or any(gid in groups for gid, _ in self.tenants):
            return None
        return (f"access denied: uid {peer.uid} is neither an allowed user nor in an allowed "
                "group (access.users, access.groups, access.tenants)")

    def check_qmp_path(self, path: Path) -> Path:
        """The resolved socket path, if it lies below an allowed directory and is what it
        claims (:func:`check_socket_identity`, when it exists yet)."""
        resolved = Path(os.path.realpath(path))
        if not path.is_absolute():
            raise InvalidRequest(f"qmp: '{path}' must be an absolute path")
        if not any(resolved.is_relative_to(d) for d in self.qmp_dirs):
            allowed = ", ".join(str(d) for d in self.qmp_dirs) or "none"
            raise InvalidRequest(f"qmp: {resolved} is outside the allowed QMP directories "
                                 f"({allowed}; config access.qmp-dirs)")
        problem = socket_identity_problem(resolved)
        if problem is not None:
            raise InvalidRequest(f"qmp: {resolved} {problem}")
        return resolved

