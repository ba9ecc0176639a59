"""The listening side: the Unix socket, its clients, and event fan-out.

The socket is either created here (mode and group from the config) or inherited from systemd socket
activation (``LISTEN_FDS``), in which case systemd owns its path and permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qmpfd.access.peer import Peer
from qmpfd.api import wire
from qmpfd.api.eventlog import EventLog
from qmpfd.api.session import Dispatcher, Session
from qmpfd.errors import QmpfdError
from qmpfd.qemu.socketfile import nothing_listens

REFUSAL_LOG_INTERVAL = 60.0   # seconds

log = logging.getLogger("qmpfd.api")

SD_LISTEN_FDS_START = 3


def socket_inherited() -> bool:
    """Whether systemd passes this process its listening socket (socket activation)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid())


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us, if it passed exactly one to this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our children
    if count < 1:
        return None
    return socket.socket(fileno=SD_LISTEN_FDS_START)


class SocketBusy(QmpfdError):
    """Something still answers on the API socket: it is never unlinked from under it."""


def socket_in_use(path: Path) -> bool:
    """Whether something may still serve ``path``: only a socket that refuses connections (or
    is not there) is provably dead; a hung daemon whose accept queue is full still owns its
    socket, and unlinking it would cut it off."""
    return not nothing_listens(path, 2.0)


def peer_of(sock: socket.socket | None) -> Peer:
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return Peer(None, None, None)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class ApiServer:
    def __init__(self, dispatch: Dispatcher, max_clients: int, max_line: int,
                 authorize: Callable[[Peer], str | None] | None = None,
                 event_ring: int = 4096) -> None:
        self._dispatch = dispatch
        self._authorize = authorize
        self._max_clients = max_clients
        self._max_line = max_line
        self._sessions: set[Session] = set()
        self.events = EventLog(event_ring)
        #: per client: which events it may see (set by the daemon from the access policy)
        self.event_filter_for: Callable[[Peer], Callable[[wire.Message], bool] | None] | None \
            = None
        #: per client: the tenant rule (its label and session limit) it is admitted by, None
        #: for full access (set by the daemon from the access policy)
        self.tenant_of: Callable[[Peer], tuple[str, int] | None] = lambda _peer: None
        self._tenant_sessions: dict[Session, str] = {}
        #: (uid, reason) -> (when last logged, refusals since): see _log_refusal
        self._refusals: dict[tuple[int | None, str], tuple[float, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self.path: Path | None = None

    async def listen(self, path: Path, mode: int, group: str | None) -> None:
        inherited = inherited_socket()
        if inherited is not None:
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=inherited)
            log.info("serving on a socket inherited from systemd")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if socket_in_use(path):
            raise SocketBusy(f"socket {path} is served by another process (another qmpfd?); "
                             "it was left alone")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a previous run; nobody listens on it
        # Create with a tight umask so the socket never exists with looser permissions.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, path=str(path))
        finally:
            os.umask(old)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
        self.path = path
        log.info("listening", extra={"socket": str(path)})

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        refusal = self._authorize(peer) if self._authorize is not None else None
        tenant = self.tenant_of(peer) if refusal is None else None
        if refusal is None:
            refusal = self._over_limit(tenant)
        if refusal is not None:
            self._log_refusal(peer.uid, peer.pid, refusal)
            writer.write(wire.encode(wire.error_reply("GenericError", refusal)))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        session = Session(reader, writer, self._dispatch, peer, self._max_line)
        if self.event_filter_for is not None:
            session.event_filter = self.event_filter_for(peer)
        self._sessions.add(session)
        if tenant is not None:
            self._tenant_sessions[session] = tenant[0]
        log.debug("client connected", extra={"peer_uid": peer.uid, "peer_pid": peer.pid})
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self._tenant_sessions.pop(session, None)

    def _over_limit(self, tenant: tuple[str, int] | None) -> str | None:
        """Why one more session is refused, if it is. Tenants together never take the last
        eighth of ``max-clients`` (full-access peers keep room to act), and each rule has its
        own ``sessions`` limit."""
        if len(self._sessions) >= self._max_clients:
            return f"too many clients (daemon.max-clients = {self._max_clients})"
        if tenant is None:
            return None
        rule, limit = tenant
        mine = sum(1 for r in self._tenant_sessions.values() if r == rule)
        if mine >= limit:
            return f"too many sessions for {rule} (its sessions = {limit})"
        if len(self._tenant_sessions) >= self._max_clients - max(1, self._max_clients // 8):
            return ("too many tenant sessions (the last eighth of daemon.max-clients is kept "
                    "for full-access peers)")
        return None

    def _log_refusal(self, uid: int | None, pid: int | None, reason: str) -> None:
        """Once per peer uid and reason per :data:`REFUSAL_LOG_INTERVAL`, with the number
        refused since the last line: a flood of connection attempts is one line a minute."""
        key = (uid, reason)
        now = time.monotonic()
        last, count = self._refusals.get(key, (-REFUSAL_LOG_INTERVAL, 0))
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusals[key] = (last, count + 1)
            return
        self._refusals[key] = (now, 0)
        log.warning("client refused", extra={"peer_uid": uid, "peer_pid": pid, "reason": reason,
                                             "refused_since_last_log": count + 1})

    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        msg = self.events.record(name, data)
        log.info("event %s", name, extra={"event": name, "data": msg["data"]})
        made: list[bytes] = []

        def encoded() -> bytes:     # once, by the first client that takes it, not per client
            if not made:
                made.append(wire.encode(msg))
            return made[0]
        for session in list(self._sessions):
            session.offer_event(msg, encoded)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                session.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
