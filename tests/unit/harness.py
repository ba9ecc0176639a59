"""What several unit-test modules share: a VM on the scripted QEMU (:class:`Harness`), the command
layer over it (:class:`Api`, with :func:`conforms`), a daemon config in a temporary directory
(:func:`config_file`) and a daemon serving in this process (:class:`Served`)."""

from __future__ import annotations

import asyncio
import socket
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qmpfd.access.audit import AuditLog
from qmpfd.access.peer import Peer
from qmpfd.access.policy import AccessPolicy
from qmpfd.api.commands import Commands
from qmpfd.client.models import Reply
from qmpfd.config import load_config
from qmpfd.daemon import Daemon
from qmpfd.host.manager import HostDevices
from qmpfd.hotplug.plan import FunctionSpec
from qmpfd.hotplug.slots import SlotTable
from qmpfd.qemu.introspect import VmIdentity
from qmpfd.state.journal import Journal
from qmpfd.vm.managed import ManagedVm, OnRemoved
from qmpfd.vm.registry import VmRegistry
from tests.unit.scripted_qemu import ScriptedQemu
from tests.unit.topologies import pc_raw, topo

SPECS = [FunctionSpec(f"d{i}", "virtio-rng-pci", i) for i in range(4)]
IDS = [s.id for s in SPECS]


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.released: list[list[str]] = []
        self.journal = Journal.open(tmp_path)

        #: what gives host functions back (the daemon wires HostDevices.release here)
        self.release: OnRemoved | None = None

        async def on_removed(vm: str, ids: list[str]) -> list[str]:
            self.released.append(sorted(ids))
            return await self.release(vm, ids) if self.release is not None else []
        self.vm = ManagedVm("v", tmp_path / "qmp.sock", lambda n, d: self.events.append((n, d)),
                            self.journal, command_timeout=1, connect_timeout=1, pending_ttl=60,
                            on_removed=on_removed)
        self.vm.table = SlotTable(topo(pc_raw()))
        self.vm.identity = VmIdentity("x86_64", "pc-i440fx-7.2", "7.2.0", (7, 2, 0))
        self.vm._policy_name = "acpi-pcihp"
        self.qemu = ScriptedQemu(self.vm.tracker, slot_wide_eject=True)
        self.vm.link = self.qemu  # type: ignore[assignment]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name]

    def eject(self, *ids: str) -> None:
        """The guest ejects these (a stale eject request): DEVICE_DELETED nobody asked for."""
        for dev in ids:
            self.qemu.devices.pop(dev, None)
            self.vm.tracker.handle_event({"event": "DEVICE_DELETED",
                                          "data": {"device": dev, "path": "/x"}})


FUNCS = [{"id": f"c{i}", "driver": "virtio-rng-pci"} for i in range(3)]


class Api:
    def __init__(self, tmp_path: Path) -> None:
        cfg = tmp_path / "qmpfd.toml"
        cfg.write_text(f'[daemon]\nsocket = "{tmp_path}/s"\nstate-dir = "{tmp_path}/state"\n'
                       f'[access]\nusers = ["root"]\nqmp-dirs = ["{tmp_path}"]\n')
        config = load_config(cfg)
        self.h = Harness(tmp_path)
        self.registry = VmRegistry(config, lambda n, d: None, self.h.journal)
        self.registry._vms["v"] = self.h.vm
        self.audit_path = tmp_path / "audit.log"
        self.commands = Commands(self.registry, AccessPolicy.from_config(config.access),
                                 AuditLog(self.audit_path), HostDevices(config.host,
                                                                        self.h.journal))
        self.session: Any = SimpleNamespace(peer=Peer(pid=1, uid=0, gid=0))

    async def __call__(self, name: str, args: dict[str, Any] | None = None) -> Any:
        reply = await self.commands.dispatch(name, args or {}, self.session)
        conforms(reply, self.commands.table[name].returns if name in self.commands.table
                 else None, name)
        return reply


    def in_qemu(self) -> set[str]:
        return set(self.h.qemu.devices)


def conforms(reply: Any, returns: Any, where: str) -> None:
    """The reply is what its model (qmpfd.client.models) says, member for member: the one
    description the client, the schema and the server share."""
    if returns is None:
        return
    if typing.get_origin(returns) is list:
        (model,) = typing.get_args(returns)
        for i, item in enumerate(reply):
            conforms(item, model, f"{where}[{i}]")
        return
    obj = returns.model_validate(reply)
    unknown = [k for k in (obj.model_extra or {})]
    assert not unknown, f"{where}: {returns.__name__} does not describe {unknown}"
    for name, field in returns.model_fields.items():
        value = reply.get(field.alias or name) if isinstance(reply, dict) else None
        inner = typing.get_args(field.annotation)
        if isinstance(value, list) and inner and isinstance(inner[0], type) and \
                issubclass(inner[0], Reply):
            conforms(value, list[inner[0]], f"{where}.{field.alias or name}")


def socket_file(path: Path) -> Path:
    """A Unix socket file at ``path`` (nobody listening): what vm-add accepts as a QMP socket
    when the replayed link stands in for QEMU."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return path


def config_file(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "qmpfd.toml"
    cfg.write_text(f'[daemon]\nsocket = "{tmp_path}/qmpfd.sock"\n'
                   f'state-dir = "{tmp_path}/state"\n'
                   f'[access]\nusers = ["root"]\nqmp-dirs = ["{tmp_path}"]\n{extra}')
    return cfg


class Served:
    def __init__(self, tmp_path: Path, extra: str = "") -> None:
        cfg = config_file(tmp_path, extra)
        self.sock = str(tmp_path / "qmpfd.sock")
        self.qmp = str(tmp_path / "pc.qmp")
        socket_file(Path(self.qmp))
        self.daemon = Daemon(load_config(cfg), config_path=cfg)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Served:
        self.task = asyncio.create_task(self.daemon.run())
        for _ in range(200):
            if Path(self.sock).exists():
                break
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.daemon.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)
