"""The daemon's wiring in this process (socket in tmp_path, VMs replayed from recorded QEMU
answers): start, serve, adopt, report health, reload, refuse a second daemon, stop cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qmpfd.client import Client
from qmpfd.config import load_config
from qmpfd.daemon import Daemon, apply_overrides, watchdog_interval
from qmpfd.errors import QmpfdError
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import config_file, socket_file
from tests.unit.replay import ReplayLink


async def test_serve_adopt_health_reload_stop(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(managed_mod, "QmpLink",
                        lambda name, _p, _t: ReplayLink("pc", name))
    cfg = config_file(tmp_path, f'[metrics]\nlisten = "unix:{tmp_path}/metrics.sock"\n')
    daemon = Daemon(load_config(cfg), config_path=cfg)
    running = asyncio.create_task(daemon.run())
    sock = tmp_path / "qmpfd.sock"
    for _ in range(100):
        if sock.exists():
            break
        await asyncio.sleep(0.02)
    socket_file(tmp_path / "pc.qmp")
    async with await Client.open(str(sock)) as c:
        assert (await c.query_version()).package.startswith("qmpfd ")
        vm = await c.vm_add("a", str(tmp_path / "pc.qmp"))
        assert vm.policy == "acpi-pcihp"
        health = await c.query_health()
        assert health.status == "ok" and health.vms[0]["link"] == "up"
        placed = await c.device_attach("a", [{"id": "x0", "driver": "virtio-rng-pci"}])
        assert placed.functions[0].id == "x0"
    r, w = await asyncio.open_unix_connection(str(tmp_path / "metrics.sock"))
    w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    await w.drain()
    scraped = (await asyncio.wait_for(r.read(), 5)).decode()
    w.close()
    assert " 200 " in scraped.splitlines()[0] and "qmpfd_operations_total" in scraped
    with pytest.raises(QmpfdError, match="state"):
        Daemon(load_config(cfg))                  # a second daemon on the same state dir
    daemon.reload()                               # same file: applied, nothing to restart
    daemon.stop()
    await asyncio.wait_for(running, 10)
    assert not sock.exists() or not (await _answers(sock))


async def _answers(sock: Path) -> bool:
    try:
        _, w = await asyncio.open_unix_connection(str(sock))
    except OSError:
        return False
    w.close()
    return True


def test_overrides_and_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = apply_overrides(load_config(config_file(tmp_path)), {"log_format": "text"})
    assert config.daemon.log_format == "text"
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0
