"""The audit log: one line per request, in order, never waited for by the reply, never an
error to the client (qmpfd.access.audit). Real files, no QEMU."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from qmpfd.access.audit import AuditLog
from qmpfd.access.peer import Peer

PEER = Peer(uid=1000, gid=1000, pid=42)


async def test_lines_in_order_private_file(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    for i in range(50):
        audit.record(PEER, "device-attach", {"vm": f"v{i}"}, "ok")   # returns at once
    await audit.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [x["arguments"]["vm"] for x in lines] == [f"v{i}" for i in range(50)]
    assert lines[0]["uid"] == 1000 and lines[0]["outcome"] == "ok"
    assert stat.S_IMODE(os.stat(tmp_path / "audit.log").st_mode) == 0o600


async def test_unwritable_audit_log_counts_failures_and_recovers(tmp_path: Path) -> None:
    target = tmp_path / "audit.log"
    target.mkdir()                                     # cannot be opened as a file
    audit = AuditLog(target)
    audit.record(PEER, "vm-add", {}, "ok")
    await audit.drain()
    assert audit.failures == 1
    target.rmdir()
    audit.record(PEER, "vm-remove", {}, "ok")
    await audit.close()
    assert json.loads(target.read_text())["command"] == "vm-remove"
