"""A QEMU link through libvirt, for VMs libvirt runs (libvirt holds their only QMP monitor).

Same interface as :class:`qmpfd.qemu.link.QmpLink` (state, connect, execute, subscribe,
close, on_disconnect), so everything above it (attach, detach, rollback, recovery) is unchanged.
Commands go through libvirt's QEMU monitor passthrough (``qemuMonitorCommand``) and events come
from its monitor-event API (``qemuMonitorEventRegister``); libvirt's domain lifecycle events and
its connection's close callback tell when the VM or libvirtd went away.

libvirt's calls block, so they run in threads; its event loop (``virEventRunDefaultImpl``) runs
in one daemon thread for the whole process, and hands events to asyncio with
``call_soon_threadsafe``. libvirt itself does not know about what qmpfd plugs (its domain XML
will not show the devices); see docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from qmpfd.errors import QemuError, Timeout, VmGone
from qmpfd.qemu.direct import OnReturn
from qmpfd.qemu.link import Command, EventFanout, EventHandler, LinkState, execute_together

log = logging.getLogger("qmpfd.qemu")

DEFAULT_URI = "qemu:///system"
_loop_started = threading.Lock()
_loop_running = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop, once per process, in a daemon thread. It must be
    registered before the first connection is opened."""
    global _loop_running
    import libvirt

    with _loop_started:
        if _loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_running = True


def domain_gone(domain: str, uri: str = DEFAULT_URI) -> bool:
    """True only when libvirt answers that the domain is not running (or does not exist); any
    doubt (libvirtd unreachable) answers False, as for a QMP socket."""
    try:
        import libvirt
    except ImportError:
        return False
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        return not conn.lookupByName(domain).isActive()
    except libvirt.libvirtError:
        return True
    finally:
        conn.close()


class LibvirtLink:
    def __init__(self, name: str, domain: str, command_timeout: float,
                 uri: str = DEFAULT_URI) -> None:
        self.name = name
        self.domain_name = domain
        self.uri = uri
        self.command_timeout = command_timeout
        self._conn: Any = None
        self._dom: Any = None
        self._callbacks: list[int] = []
        self._events = EventFanout(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = LinkState.NEW
        self.on_disconnect: Callable[[], None] | None = None
        self.commands_sent = 0

    @property
    def socket_path(self) -> str:
        return f"libvirt:{self.domain_name}"

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is LinkState.UP

    # -- connecting ------------------------------------------------------------------------
    async def connect(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._open), timeout)
        except TimeoutError as exc:
            self._state = LinkState.DOWN
            raise Timeout(f"VM '{self.name}': libvirt did not answer within {timeout:g} s") \
                from exc
        except BaseException:
            self._state = LinkState.DOWN   # the domain is down or libvirtd away: not "new"
            raise
        self._state = LinkState.UP

    def _open(self) -> None:
        try:
            import libvirt
            import libvirt_qemu
        except ImportError as exc:
            raise VmGone("libvirt-backed VMs need libvirt-python "
                         "(pip install 'qmpfd[libvirt]')") from exc
        _ensure_event_loop()
        try:
            conn = libvirt.open(self.uri)
            dom = conn.lookupByName(self.domain_name)
            if not dom.isActive():
                conn.close()
                raise VmGone(f"VM '{self.name}': libvirt domain '{self.domain_name}' is not "
                             "running")
            self._callbacks = [libvirt_qemu.qemuMonitorEventRegister(
                conn, dom, None, self._on_monitor_event, None, 0)]
            self._lifecycle = conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as exc:
            raise VmGone(f"VM '{self.name}': libvirt ({self.uri}) domain "
                         f"'{self.domain_name}': {exc.get_error_message()}") from exc
        self._conn, self._dom = conn, dom

    # -- events (called in libvirt's event thread) -----------------------------------------
    def _post(self, fn: Callable[[], None]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn)

    def _on_monitor_event(self, _conn: Any, _dom: Any, event: str, seconds: int, micros: int,
                          details: str | None, _opaque: Any) -> None:
        data = json.loads(details) if details else {}
        msg = {"event": event, "data": data,
               "timestamp": {"seconds": seconds, "microseconds": micros}}
        self._post(lambda: self._events.deliver(msg))

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, _detail: int,
                      _opaque: Any) -> None:
        import libvirt

        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN,
                     libvirt.VIR_DOMAIN_EVENT_CRASHED):
            self._post(self._lost)

    def _on_close(self, _conn: Any, _reason: int, _opaque: Any) -> None:
        self._post(self._lost)

    def _lost(self) -> None:
        if self._state is not LinkState.UP:
            return
        self._state = LinkState.DOWN
        log.warning("libvirt domain gone or libvirtd connection lost", extra={"vm": self.name})
        self._events.deliver({"event": "QMPFD_DISCONNECTED", "data": {}})
        self._release()
        if self.on_disconnect is not None:
            self.on_disconnect()

    # -- the QmpLink interface ---------------------------------------------------------------
    def subscribe(self, handler: EventHandler) -> Callable[[], None]:
        return self._events.subscribe(handler)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None, on_return: OnReturn | None = None
                      ) -> Any:
        if not self.connected:
            raise VmGone(f"VM '{self.name}' is not connected (libvirt domain "
                         f"'{self.domain_name}')")
        limit = self.command_timeout if timeout is None else timeout
        self.commands_sent += 1
        request = json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
        try:
            reply = await asyncio.wait_for(asyncio.to_thread(self._command, request), limit)
        except TimeoutError as exc:
            raise Timeout(f"VM '{self.name}': QEMU (through libvirt) did not answer {cmd} "
                          f"within {limit:g} s") from exc
        if "error" in reply:
            err = reply["error"]
            raise QemuError(f"{err.get('class', 'GenericError')}: {err.get('desc', '')}",
                            str(err.get("class", "GenericError")))
        if on_return is not None:      # libvirt answers from its own thread: called here
            on_return()
        return reply.get("return")

    async def execute_batch(self, commands: Sequence[Command],
                            timeout: float | None = None) -> list[object]:
        return await execute_together(self.execute, commands, timeout)

    def _command(self, request: str) -> dict[str, Any]:
        import libvirt
        import libvirt_qemu

        try:
            text = libvirt_qemu.qemuMonitorCommand(self._dom, request, 0)
        except libvirt.libvirtError as exc:
            self._post(self._lost)
            raise VmGone(f"VM '{self.name}': libvirt: {exc.get_error_message()}") from exc
        reply: dict[str, Any] = json.loads(text)
        return reply

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        import libvirt_qemu

        def release() -> None:
            with contextlib.suppress(Exception):
                for cb in self._callbacks:
                    libvirt_qemu.qemuMonitorEventDeregister(conn, cb)
                conn.domainEventDeregisterAny(self._lifecycle)
                conn.unregisterCloseCallback()
                conn.close()
        threading.Thread(target=release, daemon=True).start()

    async def close(self) -> None:
        self._state = LinkState.CLOSED
        self._release()
