"""Events a management plane can trust: every event has seq and boot; a client that
reconnects mid-stream replays what it missed with query-events {since} and ends up with exactly
the stream an always-connected client saw; a restart or a gap too old is said, not hidden."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def paused(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "events-paused", LabVmSpec(machine="pc", paused=True))
    yield vm
    vm.stop()


async def churn(c: Any, n: int, tag: str) -> None:
    """2n state changes: queue a function in qmpfd, cancel the queue."""
    for i in range(n):
        await c.execute("function-add", {"vm": "e", "id": f"{tag}{i}", "driver": "e1000",
                                         "bus": "pci.0", "slot": 9, "function": 1})
        await c.execute("pending-cancel", {"vm": "e", "bus": "pci.0", "slot": 9})


async def seen_cancel(c: Any, dev_id: str, timeout: float = 30) -> None:
    """Wait until ``c`` has the PENDING_CANCELLED of ``dev_id`` (the last of a churn: every
    earlier event reached it before)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(e["event"] == "PENDING_CANCELLED" and dev_id in e["data"].get("ids", [])
                  for e in c.events.history):
        assert asyncio.get_running_loop().time() < deadline, f"no PENDING_CANCELLED {dev_id}"
        await asyncio.sleep(0.02)


def stream(events: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(e["data"]["seq"], e["event"], e["data"].get("ids", [""])[0]) for e in events]


async def test_a_reconnecting_client_misses_nothing(tmp_path: Path, paused: LabVm) -> None:
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{paused.workdir}"]',
                      daemon_config="event-ring = 64")
    d.start()
    try:
        witness = await connect(d.socket)        # stays connected throughout
        plane = await connect(d.socket)          # the plane that will drop off
        await witness.execute("vm-add", {"name": "e", "qmp": str(paused.qmp_socket)})
        await churn(witness, 5, "a")
        await seen_cancel(plane, "a4")
        seen = [dict(e) for e in plane.events.history]
        last = seen[-1]["data"]
        assert {e["data"]["boot"] for e in seen} == {last["boot"]}
        await plane.qmp.disconnect()             # mid-stream
        await churn(witness, 7, "b")             # 14 events the plane does not see
        plane = await connect(d.socket)
        replay = await plane.execute("query-events", {"since": last["seq"],
                                                      "boot": last["boot"]})
        assert replay["complete"] is True and replay["boot"] == last["boot"]
        await seen_cancel(witness, "b6")
        everything = [dict(e) for e in witness.events.history]
        assert stream(seen + replay["events"]) == stream(everything)
        kinds = {e["event"] for e in everything}
        assert {"FUNCTION_QUEUED", "PENDING_CANCELLED"} <= kinds
        assert [s for s, _, _ in stream(everything)] == list(range(1, len(everything) + 1))

        # Too far behind for the ring (64): said, with what is still there.
        await churn(witness, 40, "c")
        old = await plane.execute("query-events", {"since": 1, "boot": last["boot"]})
        assert old["complete"] is False and "no longer kept" in old["reason"]
        assert len(old["events"]) == 64
        await witness.qmp.disconnect()
        await plane.qmp.disconnect()
        # qmpfd restarted: a new boot; the old seq means nothing now, and it says so.
        d.stop()
        d.start()
        plane = await connect(d.socket)
        after = await plane.execute("query-events", {"since": last["seq"],
                                                     "boot": last["boot"]})
        assert after["complete"] is False and "restarted" in after["reason"]
        assert after["boot"] != last["boot"]
        await plane.qmp.disconnect()
    finally:
        d.stop()
