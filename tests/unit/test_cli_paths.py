"""qmpfctl's edges in this process: the progress line on a terminal, the event stream as text
and JSON, a detach's timeout taken from the VM's policy, Ctrl-C, and a reader that went away."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import qmpfd.cli as cli
from qmpfd.cli.client import Spinner, call, follow_events
from qmpfd.client import Client
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import Served
from tests.unit.replay import ReplayLink


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    async with Served(tmp_path) as s:
        yield s


async def test_the_progress_line_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with Spinner("device-detach v ...", timeout=30):
        await asyncio.sleep(0.3)
    line = term.getvalue()
    assert "device-detach v ..." in line and "of 30 s timeout" in line
    assert line.endswith("\r")                              # wiped at the end
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with Spinner("quiet"):
        await asyncio.sleep(0.05)
    assert plain.getvalue() == ""


async def test_events_followed_as_text_and_json(served: Served,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    followers = [asyncio.create_task(follow_events(served.sock, as_json)) for as_json in
                 (False, True)]
    await asyncio.sleep(0.2)
    async with await Client.open(served.sock) as c:
        await c.vm_add("a", served.qmp)
        await c.device_attach("a", [{"id": "r0", "driver": "virtio-rng-pci"}])
    await asyncio.sleep(0.2)
    for f in followers:
        f.cancel()
    lines = capsys.readouterr().out.splitlines()
    text = [ln for ln in lines if not ln.startswith("{")]
    as_json = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert any(" SLOT_ATTACHED " in ln and '"r0"' in ln for ln in text), lines
    assert any(e["event"] == "SLOT_ATTACHED" and e["data"]["ids"] == ["r0"] for e in as_json)


async def test_a_detach_waits_as_long_as_the_vms_policy(served: Served) -> None:
    async with await Client.open(served.sock) as c:
        await c.vm_add("a", served.qmp)
        await c.device_attach("a", [{"id": "r0", "driver": "virtio-rng-pci"}])
    gone = await call(served.sock, "device-detach", {"vm": "a", "ids": ["r0"]}, "detach r0")
    assert gone["ids"] == ["r0"]


def test_ctrl_c_says_what_becomes_of_the_request(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    async def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "call", interrupted)
    assert cli.main(["--socket", "/nonexistent", "slots", "v"]) == cli.INTERRUPTED
    assert "qmpfd carries on with query-slots on its own" in capsys.readouterr().err


def test_a_reader_that_went_away(monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.fd = os.open(os.devnull, os.O_WRONLY)

        def write(self, _s: str) -> int:
            raise BrokenPipeError

        def fileno(self) -> int:
            return self.fd
    gone = Gone()
    monkeypatch.setattr(sys, "stdout", gone)
    with pytest.raises(SystemExit) as ended:
        cli.emit("anything")
    assert ended.value.code == 0
    os.close(gone.fd)
