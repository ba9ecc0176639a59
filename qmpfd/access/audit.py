"""The audit log: one JSON line per state-changing request, with the peer's uid and the outcome.

Appended with aiofiles so a slow disk never blocks the event loop; each line is written whole.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiofiles

from qmpfd.api.session import Peer


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def record(self, peer: Peer, command: str, arguments: dict[str, Any],
                     outcome: str) -> None:
        line = json.dumps({
            "ts": round(time.time(), 3), "uid": peer.uid, "gid": peer.gid, "pid": peer.pid,
            "command": command, "arguments": arguments, "outcome": outcome,
        }, default=str, separators=(",", ":")) + "\n"
        async with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            async with aiofiles.open(self.path, "a") as f:
                await f.write(line)
