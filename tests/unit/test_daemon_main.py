"""The daemon's entry point and its runtime duties in this process: ``main`` with its signals
(SIGHUP reloads, SIGTERM stops), configs refused at start or reload, a damaged journal set aside
only when asked, health problems, the systemd watchdog, a tenant's event filter, and the
metrics listener's answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from qmpfd.access.peer import Peer
from qmpfd.api import metrics_http
from qmpfd.config import load_config
from qmpfd.daemon import Daemon, main, open_journal
from qmpfd.errors import QmpfdError
from qmpfd.vm import managed as managed_mod
from tests.unit.harness import config_file, socket_file
from tests.unit.replay import ReplayLink


def _signal_when_listening(sock: Path, *signals: signal.Signals) -> threading.Thread:
    def send() -> None:
        for _ in range(500):
            if sock.exists():
                break
            threading.Event().wait(0.01)
        for sig in signals:
            os.kill(os.getpid(), sig)
            threading.Event().wait(0.1)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_main_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    thread = _signal_when_listening(tmp_path / "qmpfd.sock", signal.SIGHUP, signal.SIGTERM)
    assert main(["--config", str(cfg), "--log-format", "text"]) == 0
    thread.join(5)
    assert not (tmp_path / "qmpfd.sock").exists()


def test_main_refuses_a_bad_config_and_a_damaged_journal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nmax-clients = 0\n")
    assert main(["--config", str(bad)]) == 2
    assert "max-clients" in capsys.readouterr().err
    cfg = config_file(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    journal = open_journal(state, False)
    path = journal.path
    journal.close()
    path.write_text("garbage that is no record\n{\"v\": 1}\n")
    assert main(["--config", str(cfg)]) == 1
    assert "--set-aside-damaged-journal" in capsys.readouterr().err
    aside = open_journal(state, True)
    assert aside.ops == {} and list(state.glob("*.damaged-*"))
    aside.close()


async def test_reload_health_watchdog_and_tenant_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_file(tmp_path, f'[[access.tenants]]\ngroup = 4321\nvms = ["a-*"]\n'
                                f'[metrics]\nlisten = "unix:{tmp_path}/m.sock"\n')
    notified: list[str] = []
    monkeypatch.setattr("qmpfd.systemd.notify", lambda state: notified.append(state) or True)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = Daemon(load_config(cfg), config_path=cfg)
    running = asyncio.create_task(daemon.run())
    for _ in range(200):
        if "READY=1" in notified:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.15)
    assert "WATCHDOG=1" in notified
    cfg.write_text(cfg.read_text().replace("qmpfd.sock", "other.sock")
                   .replace('vms = ["a-*"]', 'vms = ["a-*", "c-*"]'))
    monkeypatch.setattr("qmpfd.logs.setup", lambda *_: None)   # keep pytest's log capture
    with caplog.at_level(logging.INFO, logger="qmpfd"):
        daemon.reload()                                   # tenants applied; the socket waits
    reloaded = [r for r in caplog.records if r.getMessage().startswith("config reloaded")]
    assert reloaded and reloaded[-1].needs_restart == ["daemon.socket"]  # type: ignore[attr-defined]
    assert daemon.config.daemon.socket.name == "qmpfd.sock"          # still the one in use
    scope = daemon.access.scope(Peer(1, 9999, 4321))
    assert scope is not None and scope.allows("c-1")
    cfg.write_text("[daemon]\nmax-clients = 0\n")
    daemon.reload()                                       # refused: the running config stays
    assert daemon.access.scope(Peer(1, 9999, 4321)) is scope
    tenant = daemon._event_filter(Peer(1, 9999, 4321))
    assert tenant({"data": {"vm": "a-1"}}) and not tenant({"data": {"vm": "b-1"}})
    monkeypatch.setattr(type(daemon.journal), "last_error", property(lambda _j: "scripted"))
    daemon.loop_lag_max = 2.0
    health = daemon.health()
    assert health["status"] == "degraded" and len(health["problems"]) == 2
    for request, expect in ((b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text"
                             b"\r\n\r\n", b"# EOF"),
                            (b"POST /x HTTP/1.0\r\n\r\n", b"404"),
                            (b"GET", b"")):
        r, w = await asyncio.open_unix_connection(str(tmp_path / "m.sock"))
        w.write(request)
        w.write_eof()
        answer = await asyncio.wait_for(r.read(), 10)
        w.close()
        assert expect in answer
    daemon.stop()
    await asyncio.wait_for(running, 10)


async def test_metrics_on_loopback_tcp() -> None:
    server = await metrics_http.serve("127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    answer = await asyncio.wait_for(r.read(), 10)
    w.close()
    server.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    cfg = config_file(tmp_path)
    first = Daemon(load_config(cfg))
    with pytest.raises(QmpfdError):
        Daemon(load_config(cfg))
    first.journal.close()


async def test_metrics_connections_are_capped_and_admitted(tmp_path: Path) -> None:
    """Connections held open cannot pile up (the cap answers 503 at once), and on a Unix
    socket a peer the API would turn away is turned away (403)."""
    admitted = {"ok": True}
    server = await metrics_http.serve(
        f"unix:{tmp_path}/m.sock",
        lambda peer: None if admitted["ok"] else f"access denied: uid {peer.uid}",
        max_connections=2)
    path = str(tmp_path / "m.sock")
    try:
        held = [await asyncio.open_unix_connection(path) for _ in range(2)]
        await asyncio.sleep(0.05)
        r, w = await asyncio.open_unix_connection(path)
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 503")
        w.close()
        for _, hw in held:
            hw.close()
        await asyncio.sleep(0.05)
        admitted["ok"] = False
        r, w = await asyncio.open_unix_connection(path)
        answer = await asyncio.wait_for(r.read(), 5)
        assert answer.startswith(b"HTTP/1.1 403") and b"access denied: uid 0" in answer
        w.close()
        admitted["ok"] = True
        r, w = await asyncio.open_unix_connection(path)
        w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        server.close()


def test_only_a_socket_that_refuses_is_dead() -> None:
    """A hung daemon (its accept queue full) still owns its socket; only a refusing socket
    (nobody listening) or a missing one may be taken over."""
    import socket as sk
    import tempfile

    from qmpfd.api.server import socket_in_use

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "api.sock"
        assert not socket_in_use(path)
        with sk.socket(sk.AF_UNIX) as dead:
            dead.bind(str(path))                       # bound, never listening: refuses
            assert not socket_in_use(path)
        path.unlink()
        with sk.socket(sk.AF_UNIX) as hung:
            hung.bind(str(path))
            hung.listen(0)                             # never accepts: the queue fills up
            waiting = []
            for _ in range(4):
                c = sk.socket(sk.AF_UNIX)
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(str(path))
                waiting.append(c)
            assert socket_in_use(path)                 # cannot be proven dead: left alone
            for c in waiting:
                c.close()


async def test_state_dir_deleted_under_a_running_daemon_and_a_second_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(managed_mod, "QmpLink", lambda name, _p, _t: ReplayLink("pc", name))
    socket_file(tmp_path / "pc.qmp")
    cfg = config_file(tmp_path, f'[[vm]]\nname = "a"\nqmp = "{tmp_path}/pc.qmp"\n')
    first = Daemon(load_config(cfg), config_path=cfg)
    running = asyncio.create_task(first.run())
    for _ in range(200):
        if (tmp_path / "qmpfd.sock").exists():
            break
        await asyncio.sleep(0.01)
    shutil.rmtree(tmp_path / "state")
    health = first.health()
    assert health["status"] == "degraded"
    assert any(p.startswith("state:") and "was removed" in p for p in health["problems"])
    assert [v.name for v in first.vms.all()] == ["a"]
    # A second daemon on the same path gets the (new) state directory, but the socket is
    # served: it stops before adopting anything.
    second = Daemon(load_config(cfg), config_path=cfg)
    with pytest.raises(QmpfdError, match="served by another process"):
        await second.run()
    assert second.vms.all() == []
    second.journal.close()
    first.stop()
    await asyncio.wait_for(running, 10)


def test_a_reload_narrows_a_full_access_peers_event_stream_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter of a connected full-access peer is looked up per event: a reload that makes
    its group a tenant narrows it, one that drops the group silences it."""
    cfg = config_file(tmp_path, "groups = [555]\n")
    monkeypatch.setattr("qmpfd.systemd.notify", lambda _state: True)
    monkeypatch.setattr("qmpfd.logs.setup", lambda *_: None)
    daemon = Daemon(load_config(cfg), config_path=cfg)
    try:
        stream = daemon._event_filter(Peer(1, 1234, 555))
        assert stream({"data": {"vm": "a-1"}}) and stream({"data": {"vm": "b-1"}})
        cfg.write_text(cfg.read_text().replace(
            "groups = [555]\n", "") + '[[access.tenants]]\ngroup = 555\nvms = ["a-*"]\n')
        daemon.reload()
        assert stream({"data": {"vm": "a-1"}}) and not stream({"data": {"vm": "b-1"}})
        cfg.write_text(config_file(tmp_path).read_text())
        daemon.reload()
        assert not stream({"data": {"vm": "a-1"}}) and not stream({"event": "X", "data": {}})
    finally:
        daemon.journal.close()
