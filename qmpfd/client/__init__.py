"""``qmpfd.client``: the typed async client a management plane uses (qmpfctl uses it too).

    async with await Client.open("/run/qmpfd/qmpfd.sock") as qmpfd:
        placed = await qmpfd.device_attach("web1", [
            {"id": "gpu0", "host": "0000:01:00.0"},
            {"id": "gpu0-audio", "host": "0000:01:00.1"}])
        ...
        await qmpfd.device_detach("web1", ids=[f.id for f in placed.functions])

One method per command of the contract, replies as pydantic models (:mod:`.models`), error
replies as exceptions of the contract's classes (:mod:`.errors`), and :meth:`Client.events`, an
async iterator of events that, after a reconnect, replays what was missed (``query-events``).
It is a QMP client like any other (``qemu.qmp.QMPClient`` underneath).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from qmpfd.client import errors, models
from qmpfd.client.errors import QmpfdClientError, Unreachable

__all__ = ["Client", "EventsLost", "QmpfdClientError", "Unreachable", "errors", "models"]

M = TypeVar("M", bound=BaseModel)


def refusal_reason(path: str) -> str | None:
    """What qmpfd said when it turned a connection away (one error object instead of a
    greeting), so the caller sees qmpfd's reason rather than a greeting parse error."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            msg = json.loads(s.makefile("rb").readline())
    except (OSError, ValueError):
        return None
    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
        return str(msg["error"].get("desc"))
    return None


def _args(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments to wire arguments: None dropped, dry_run -> dry-run."""
    return {k.replace("_", "-"): v for k, v in kwargs.items() if v is not None}


class Client:
    def __init__(self, path: str, qmp: QMPClient) -> None:
        self.path = path
        self._qmp = qmp
        # The library's own all-events listener: a second one would hold every event twice,
        # the first copy never read.
        self._listener = qmp.events

    @classmethod
    async def open(cls, path: str, name: str = "qmpfd-client") -> Client:
        qmp = QMPClient(name)
        try:
            await qmp.connect(path)
        except (QMPError, OSError) as exc:
            reason = await asyncio.to_thread(refusal_reason, path)
            if reason:
                raise Unreachable(f"qmpfd at {path} refused the connection: {reason}") from None
            cause = exc.__cause__ if isinstance(exc, QMPError) and exc.__cause__ else exc
            text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
            raise Unreachable(f"cannot reach qmpfd at {path}: {text}") from None
        return cls(path, qmp)

    async def close(self) -> None:
        await self._qmp.disconnect()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Any command, raw JSON in and out; error replies raise the contract's exceptions."""
        try:
            return await self._qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise errors.from_reply(exc.error_class, str(exc)) from None

    async def _typed(self, model: type[M], command: str, args: dict[str, Any] | None = None
                     ) -> M:
        return model.model_validate(await self.execute(command, args))

    async def _list(self, model: type[M], command: str, args: dict[str, Any] | None = None
                    ) -> list[M]:
        return [model.model_validate(x) for x in await self.execute(command, args)]

    # -- VMs -------------------------------------------------------------------------------
    async def vm_add(self, name: str, qmp: str | None = None, *,
                     libvirt: str | None = None) -> models.Vm:
        """Adopt a VM by its QMP socket, or one libvirt runs by its domain (name or UUID)."""
        return await self._typed(models.Vm, "vm-add", _args(name=name, qmp=qmp,
                                                            libvirt=libvirt))

    async def vm_remove(self, name: str, force: bool = False) -> models.Removed:
        return await self._typed(models.Removed, "vm-remove",
                                 _args(name=name, force=force or None))

    async def query_vms(self) -> list[models.Vm]:
        return await self._list(models.Vm, "query-vms")

    async def query_slots(self, vm: str, refresh: bool = False) -> list[models.Slot]:
        return await self._list(models.Slot, "query-slots", _args(vm=vm, refresh=refresh))

    async def query_policy(self, vm: str) -> dict[str, Any]:
        return dict(await self.execute("query-policy", {"vm": vm}))

    # -- hotplug ---------------------------------------------------------------------------
    async def device_attach(self, vm: str, functions: Sequence[dict[str, Any]], *,
                            bus: str | None = None, slot: int | None = None,
                            dry_run: bool = False, timeout: float | None = None,
                            force: bool = False) -> models.Attached:
        return await self._typed(models.Attached, "device-attach", _args(
            vm=vm, functions=list(functions), bus=bus, slot=slot, dry_run=dry_run or None,
            timeout=timeout, force=force or None))

    async def device_attach_xml(self, vm: str, xml: str, *, dry_run: bool = False,
                                force: bool = False) -> models.Attached:
        return await self._typed(models.Attached, "device-attach-xml", _args(
            vm=vm, xml=xml, dry_run=dry_run or None, force=force or None))

    async def function_add(self, vm: str, id: str, driver: str, bus: str, slot: int,
                           function: int, properties: dict[str, Any] | None = None
                           ) -> models.Attached:
        return await self._typed(models.Attached, "function-add", _args(
            vm=vm, id=id, driver=driver, bus=bus, slot=slot, function=function,
            properties=properties))

    async def query_pending(self, vm: str | None = None) -> list[models.Pending]:
        return await self._list(models.Pending, "query-pending", _args(vm=vm))

    async def pending_cancel(self, vm: str, bus: str, slot: int) -> models.Pending:
        return await self._typed(models.Pending, "pending-cancel",
                                 {"vm": vm, "bus": bus, "slot": slot})

    async def device_detach(self, vm: str, ids: Sequence[str] | None = None, *,
                            bus: str | None = None, slot: int | None = None,
                            whole_slot: bool = False, timeout: float | None = None,
                            force: bool = False) -> models.Detached:
        return await self._typed(models.Detached, "device-detach", _args(
            vm=vm, ids=list(ids) if ids else None, bus=bus, slot=slot,
            whole_slot=whole_slot or None, timeout=timeout, force=force or None))

    async def query_operations(self, vm: str | None = None, ended: bool = False
                               ) -> list[models.Operation]:
        return await self._list(models.Operation, "query-operations",
                                _args(vm=vm, ended=ended or None))

    # -- the daemon ------------------------------------------------------------------------
    async def query_version(self) -> models.Version:
        return await self._typed(models.Version, "query-version")

    async def query_health(self) -> models.Health:
        return await self._typed(models.Health, "query-health")

    async def query_events(self, since: int | None = None, boot: str | None = None
                           ) -> models.Replay:
        return await self._typed(models.Replay, "query-events", _args(since=since, boot=boot))

    async def query_host_devices(self, multifunction_only: bool = False) -> list[Any]:
        return list(await self.execute("query-host-devices",
                                       _args(multifunction_only=multifunction_only or None)))

    async def vm_qmp(self, vm: str, command: str,
                     arguments: dict[str, Any] | None = None) -> Any:
        return await self.execute("vm-qmp", _args(vm=vm, command=command,
                                                  arguments=arguments))

    async def events(self, after: tuple[str, int] | None = None
                     ) -> AsyncIterator[models.Event]:
        """Events in order, as they arrive. With ``after=(boot, seq)``, the last event a plane
        handled before it (re)connected, the ones it missed come first (from query-events),
        then the live ones, none twice. If qmpfd can no longer replay them all (its ring is
        smaller than the gap, or it restarted), :class:`EventsLost` says so: re-read the state
        (query-vms, query-slots, query-operations) and go on from the events that follow."""
        last: tuple[str, int] | None = None
        if after is not None:
            replay = await self.query_events(since=after[1], boot=after[0])
            if not replay.complete:
                raise EventsLost(replay.reason or "events were lost", replay)
            for ev in replay.events:
                yield ev
                last = (ev.boot, ev.seq)
        async for raw in self._listener:
            ev = models.Event.model_validate(dict(raw))
            if last is not None and ev.boot == last[0] and ev.seq <= last[1]:
                continue                       # already delivered by the replay
            yield ev


class EventsLost(QmpfdClientError):
    """query-events could not replay every event after the plane's last one."""

    def __init__(self, reason: str, replay: models.Replay) -> None:
        super().__init__(reason)
        self.error_class = "EventsLost"
        self.replay = replay
