"""A JSON document on disk that is always either the old or the new version, never half of one.

Write to a temporary file in the same directory, fsync it, rename it over the old file, then fsync
the directory so the rename itself survives a power cut (the classic sequence; rename(2) is atomic
within a filesystem).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

log = logging.getLogger("qmpfd.state")


class StateStore:
    def __init__(self, directory: Path, name: str = "state.json") -> None:
        self.directory = directory
        self.path = directory / name
        self._lock = asyncio.Lock()

    def load(self) -> dict[str, Any]:
        """The saved document, or {} if there is none. A corrupt file is kept aside, not lost."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            log.error("state file unreadable; moved aside", extra={"path": str(aside),
                                                                   "error": str(exc)})
            return {}
        return doc if isinstance(doc, dict) else {}

    async def save(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, indent=1, sort_keys=True)
        async with self._lock:
            await aiofiles.os.makedirs(self.directory, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            async with aiofiles.open(tmp, "w") as f:
                await f.write(data)
                await f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
            await aiofiles.os.replace(tmp, self.path)
            await asyncio.to_thread(_fsync_dir, self.directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
