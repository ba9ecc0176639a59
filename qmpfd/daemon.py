"""The ``qmpfd`` daemon: configuration, the API socket, VM adoption, signals, shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qmpfd import __version__, logs, metrics, systemd
from qmpfd.access.audit import AuditLog
from qmpfd.access.peer import Peer
from qmpfd.access.policy import AccessPolicy
from qmpfd.api import metrics_http
from qmpfd.api.commands import Commands
from qmpfd.api.server import ApiServer, SocketBusy, socket_in_use, socket_inherited
from qmpfd.config import Config, load_config, needs_restart
from qmpfd.errors import QmpfdError
from qmpfd.eventloop import loop_factory, running_loop_name
from qmpfd.host.manager import HostDevices
from qmpfd.state.journal import Journal
from qmpfd.state.lock import lock_state_dir, prepare_state_dir
from qmpfd.state.log import JournalDamaged
from qmpfd.vm.registry import VmRegistry

log = logging.getLogger("qmpfd")

LAG_PROBE = 0.5      # seconds between event-loop lag samples
LAG_DECAY = 0.98     # the reported maximum fades over a few minutes


class Daemon:
    def __init__(self, config: Config, *, set_aside_damaged: bool = False,
                 config_path: Path | None = None, overrides: dict[str, Any] | None = None
                 ) -> None:
        self.config = config
        self.config_path = config_path
        self._overrides = overrides or {}
        d = config.daemon
        prepare_state_dir(d.state_dir)
        self._lock_fd = lock_state_dir(d.state_dir)   # before reading anything in it
        self.access = AccessPolicy.from_config(config.access)
        # The access policy is looked up on each use, so a reload replaces it for every caller.
        self.server = ApiServer(self._dispatch, d.max_clients, d.max_line_bytes,
                                authorize=lambda peer: self.access.admit(peer),
                                event_ring=d.event_ring)
        self.server.event_filter_for = self._event_filter
        self.server.tenant_of = self._tenant_of
        self.journal = open_journal(d.state_dir, set_aside_damaged)
        self.host = HostDevices(config.host, self.journal)
        self.vms = VmRegistry(config, self.server.broadcast, self.journal,
                              check_path=lambda path: self.access.check_qmp_path(path),
                              on_removed=self.host.release,
                              on_connected=self.host.release_absent)
        audit = AuditLog(config.access.audit_log or config.daemon.state_dir / "audit.log")
        self.commands = Commands(self.vms, self.access, audit, self.host, self.server.events)
        self.commands.health = self.health
        self.loop_lag = 0.0
        self.loop_lag_max = 0.0
        self._stop = asyncio.Event()

    async def _dispatch(self, name: str, args: dict[str, Any], session: Any) -> Any:
        return await self.commands.dispatch(name, args, session)

    def stop(self) -> None:
        self._stop.set()

    def _state_counts(self) -> dict[str, Any]:
        vms = self.vms.all()
        return {"vms": len(vms), "connected": sum(vm.link.connected for vm in vms),
                "queued": sum(len(e.functions) for vm in vms for e in vm.queued()),
                "orphaned": sum(len(vm.orphans()) for vm in vms),
                "held": len(self.journal.host), "in_flight": len(self.journal.ops)}

    async def _measure_lag(self) -> None:
        """How late the event loop wakes up (a blocked loop delays every request and event)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_PROBE)
            self.loop_lag = max(0.0, time.monotonic() - before - LAG_PROBE)
            self.loop_lag_max = max(self.loop_lag_max * LAG_DECAY, self.loop_lag)

    def health(self) -> dict[str, Any]:
        vms = [{"name": vm.name, "link": vm.link.state.value} for vm in self.vms.all()]
        problems = [f"VM {v['name']}: link {v['link']}" for v in vms if v["link"] != "up"]
        state = self.journal.problem()
        if state is not None:
            problems.append(f"state: {state}")
        elif self.journal.last_error:
            problems.append(f"journal: last write failed: {self.journal.last_error}")
        if self.loop_lag_max > 1.0:
            problems.append(f"event loop lagged {self.loop_lag_max:.2f} s")
        return {"status": "degraded" if problems else "ok", "problems": problems,
                "version": __version__, "boot": self.server.events.boot,
                "event-loop": running_loop_name(),
                "loop-lag": round(self.loop_lag, 4), "loop-lag-max": round(self.loop_lag_max, 4),
                "journal": {"path": str(self.journal.path), "syncs": self.journal.syncs,
                            "last-error": self.journal.last_error},
                "vms": vms}

    def _tenant_of(self, peer: Peer) -> tuple[str, int] | None:
        scope = self.access.scope(peer)
        return (scope.rule, scope.sessions) if scope is not None else None

    def _event_filter(self, peer: Peer) -> Callable[[dict[str, Any]], bool]:
        """A peer's event stream holds the events of the VMs it may see, looked up per event:
        a reload of [access] applies to connected clients at once, whether it narrows a tenant,
        makes a full-access peer a tenant, or removes the peer's rule (then nothing at all)."""
        def allowed(msg: dict[str, Any]) -> bool:
            if self.access.admit(peer) is not None:
                return False
            scope = self.access.scope(peer)
            return scope is None or scope.allows(msg.get("data", {}).get("vm"))
        return allowed

    def reload(self) -> None:
        """SIGHUP (``systemctl reload``): read the config file again and apply what can change
        while running (log level and format, access control); clients and QMP connections stay.
        A config that does not load is refused, naming the file and the key, and the running
        one is kept. Socket, state directory and limits need a restart (logged if changed)."""
        systemd.notify("RELOADING=1")
        try:
            new = apply_overrides(load_config(self.config_path), self._overrides)
            access = AccessPolicy.from_config(new.access)
        except QmpfdError as exc:
            log.error("config reload refused; keeping the running config",
                      extra={"path": str(self.config_path), "error": exc.desc})
            systemd.notify("READY=1")
            return
        restart_needed = needs_restart(self.config, new)
        logs.setup(new.daemon.log_level, new.daemon.log_format)
        self.access = access
        self.commands.access = access
        # What is not applied stays as it runs: the config held is the one in effect.
        self.config.daemon.log_level = new.daemon.log_level
        self.config.daemon.log_format = new.daemon.log_format
        self.config.access = new.access.model_copy(update={"audit_log":
                                                           self.config.access.audit_log})
        (log.warning if restart_needed else log.info)(
            "config reloaded" + ("; some changes need a restart" if restart_needed else ""),
            extra={"path": str(self.config_path), "needs_restart": restart_needed})
        systemd.notify("READY=1")

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop that stops turning stops the pings, and
        systemd restarts qmpfd (WatchdogSec in the unit)."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self) -> None:
        d = self.config.daemon
        # Another daemon serving this socket (its state dir elsewhere, or deleted and made
        # again) must not have its VMs adopted and reconciled by this one: refuse first.
        if not socket_inherited() and await asyncio.to_thread(socket_in_use, d.socket):
            raise SocketBusy(f"socket {d.socket} is served by another process (another "
                             "qmpfd?); not adopting its VMs; it was left alone")
        # Re-adopt (and reconcile) before listening: the first client already sees every VM
        # and no operation left over from a crash. Unreachable VMs are retried in the background.
        await self.vms.readopt()
        await self.server.listen(d.socket, d.socket_mode, d.socket_group)
        metrics_server = None
        collector = metrics.StateCollector(self._state_counts)
        if self.config.metrics.listen:
            metrics.REGISTRY.register(collector)   # unregistered at shutdown: one per daemon
            try:
                metrics_server = await metrics_http.serve(
                    self.config.metrics.listen, lambda peer: self.access.admit(peer))
            except BaseException:
                metrics.REGISTRY.unregister(collector)
                raise
        lag = asyncio.create_task(self._measure_lag())
        systemd.notify("READY=1")
        interval = watchdog_interval()
        watchdog = asyncio.create_task(self._watchdog(interval)) if interval else None
        log.info("qmpfd ready", extra={"version": __version__,
                                       "event_loop": running_loop_name()})
        await self._stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        lag.cancel()
        if metrics_server is not None:
            metrics_server.close()
            metrics.REGISTRY.unregister(collector)
        systemd.notify("STOPPING=1")
        log.info("shutting down")
        await self.server.close()
        await self.vms.close()
        await self.journal.drain()
        await self.commands.audit.close()
        self.journal.close()


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), if the watchdog is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """The command line's --socket/--state-dir/--log-format win over the file, on reload too."""
    for key, value in overrides.items():
        setattr(config.daemon, key, value)
    return config


def open_journal(state_dir: Path, set_aside_damaged: bool) -> Journal:
    """The journal, or a clear refusal: a damaged journal is only set aside when asked to."""
    try:
        return Journal.open(state_dir)
    except JournalDamaged as exc:
        if not set_aside_damaged:
            raise QmpfdError(f"{exc}; refusing to start (start with "
                             "--set-aside-damaged-journal to move it aside and start with an "
                             "empty journal)") from None
        aside = exc.path.with_name(f"{exc.path.name}.damaged-{int(time.time())}")
        os.replace(exc.path, aside)
        log.error("damaged journal moved aside; starting empty",
                  extra={"path": str(aside), "error": str(exc)})
        return Journal.open(state_dir)


def build_parser() -> argparse.ArgumentParser:
    """qmpfd's command line (also the source of its man page)."""
    p = argparse.ArgumentParser(prog="qmpfd", description=__doc__)
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    p.add_argument("--socket", type=Path, help="API socket path (overrides the config)")
    p.add_argument("--state-dir", type=Path, help="state directory (overrides the config)")
    p.add_argument("--log-format", choices=["json", "text"], help="overrides the config")
    p.add_argument("--set-aside-damaged-journal", action="store_true",
                   help="if the journal is damaged, move it aside and start empty "
                        "(otherwise qmpfd refuses to start)")
    p.add_argument("--version", action="version", version=f"qmpfd {__version__}")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except QmpfdError as exc:
        print(f"qmpfd: {exc.desc}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("socket", args.socket), ("state_dir", args.state_dir),
                                   ("log_format", args.log_format)) if v}
    config = apply_overrides(config, overrides)
    logs.setup(config.daemon.log_level, config.daemon.log_format)

    async def run() -> None:
        daemon = Daemon(config, set_aside_damaged=args.set_aside_damaged_journal,
                        config_path=args.config, overrides=overrides)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        loop.add_signal_handler(signal.SIGHUP, daemon.reload)
        await daemon.run()

    try:
        with asyncio.Runner(loop_factory=loop_factory(config.daemon.event_loop)) as runner:
            runner.run(run())
    except QmpfdError as exc:
        log.error("fatal: %s", exc.desc)
        print(f"qmpfd: {exc.desc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("fatal: %s", exc)
        print(f"qmpfd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
