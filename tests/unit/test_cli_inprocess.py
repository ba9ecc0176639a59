"""qmpfctl end to end against a daemon running in this process (its VM answered from recorded
QEMU replies, hotplug by the scripted QEMU): every subcommand, as text and as JSON, and the
errors it turns into exit statuses."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpfd.cli import main
from qmpfd.config import load_config
from qmpfd.daemon import Daemon
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import config_file, socket_file
from tests.unit.replay import ReplayLink


class Running:
    def __init__(self, tmp_path: Path) -> None:
        cfg = config_file(tmp_path)
        self.sock = str(tmp_path / "qmpfd.sock")
        self.qmp = tmp_path / "pc.qmp"
        socket_file(self.qmp)
        self.loop = asyncio.new_event_loop()
        self.daemon = Daemon(load_config(cfg), config_path=cfg)
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.daemon.run(),), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        for _ in range(200):
            if Path(self.sock).exists():
                break
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stop)
        self.thread.join(10)
        self.loop.close()

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        status = main(["--socket", self.sock, *argv])
        out = capsys.readouterr()
        return status, out.out, out.err


@pytest.fixture
def qmpfd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    with Running(tmp_path) as running:
        yield running


def test_every_subcommand_as_text_and_json(qmpfd: Running, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = qmpfd.cli
    status, out, _ = run(capsys, "vm", "add", "a", str(qmpfd.qmp))
    assert status == 0 and "a" in out
    status, out, _ = run(capsys, "--json", "vm", "list")
    assert status == 0 and json.loads(out)[0]["name"] == "a"
    assert run(capsys, "policy", "a")[0] == 0
    nic = tmp_path / "nic.json"
    nic.write_text(json.dumps([{"id": f"n{i}", "driver": "virtio-rng-pci"} for i in range(2)]))
    status, out, _ = run(capsys, "attach", "a", str(nic), "--dry-run")
    assert status == 0 and "dry run" in out.lower()
    status, out, _ = run(capsys, "--json", "attach", "a", str(nic))
    placed = json.loads(out)
    assert status == 0 and [f["id"] for f in placed["functions"]] == ["n0", "n1"]
    status, out, _ = run(capsys, "slots", "a")
    assert status == 0 and "n0" in out and "n1" in out
    slot = f"0x{placed['slot']:02x}"
    status, out, _ = run(capsys, "detach", "a", "n0")       # one id of two: refused
    assert status == 1
    status, out, _ = run(capsys, "detach", "a", "n0", "n1")
    assert status == 0
    assert run(capsys, "add-function", "a", "q1", "virtio-rng-pci", "pci.0", slot, "1")[0] == 0
    status, out, _ = run(capsys, "pending")
    assert status == 0 and "q1" in out
    status, out, _ = run(capsys, "--json", "pending", "a", "--cancel", "pci.0", slot)
    assert status == 0 and json.loads(out)["functions"][0]["id"] == "q1"
    assert run(capsys, "version")[0] == 0
    status, out, _ = run(capsys, "vm", "remove", "a")
    assert status == 0


def test_errors_become_exit_statuses_and_qmp_error_objects(
        qmpfd: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = qmpfd.cli(capsys, "slots", "nope")
    assert status == 1 and "NotFound" in err
    status, out, _ = qmpfd.cli(capsys, "--json", "slots", "nope")
    assert status == 1 and json.loads(out)["error"]["class"] == "NotFound"
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    status, _, err = qmpfd.cli(capsys, "attach", "a", str(bad))
    assert status == 2 and "not JSON" in err
    bad.write_text("42")
    assert qmpfd.cli(capsys, "attach", "a", str(bad))[0] == 2
    bad.write_bytes(b"\xff\xfe\x00")
    assert qmpfd.cli(capsys, "attach", "a", str(bad))[0] == 2
    assert qmpfd.cli(capsys, "attach", "a", str(tmp_path / "missing.json"))[0] == 2
    status = main(["--socket", str(tmp_path / "none.sock"), "version"])
    assert status == 1 and "GenericError" in capsys.readouterr().err
