"""The least a Python relay can cost: qmpfd's wire (greeting, qmp_capabilities, vm-add,
device-attach, device-detach, vm-remove) relayed to QEMU with nothing between the two sockets
but JSON: uvloop where installed, an ``asyncio.Protocol`` on each side, no QMP library, no task
per request (each reply is a callback of the reply before it). bench/floor_relay.py is the
same relay through qemu.qmp, the library qmpfd is built on; this one is below any daemon
that uses it.

    python bench/bare_relay.py SOCKET       (bench.ab_cpu --floor --bare runs it as an arm)
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

Reply = Callable[[dict[str, Any]], None]
_DECODER = json.JSONDecoder()


def split(buf: str) -> tuple[list[dict[str, Any]], str]:
    """Whole JSON messages at the start of ``buf``, and what is left."""
    out = []
    buf = buf.lstrip()
    while buf:
        try:
            msg, end = _DECODER.raw_decode(buf)
        except ValueError:
            break
        out.append(msg)
        buf = buf[end:].lstrip()
    return out, buf


class Qemu(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = ""
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, Reply] = {}
        self.deleted: dict[str, Callable[[], None]] = {}
        self.next_id = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport   # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        msgs, self.buf = split(self.buf + data.decode())
        for msg in msgs:
            if "QMP" in msg:
                self.send("qmp_capabilities", {}, lambda _: self.ready.set_result(None))
            elif "id" in msg:
                self.pending.pop(msg["id"])(msg)
            elif msg.get("event") == "DEVICE_DELETED":
                done = self.deleted.pop(str(msg["data"].get("device", "")), None)
                if done is not None:
                    done()

    def send(self, cmd: str, args: dict[str, Any], then: Reply) -> None:
        self.next_id += 1
        self.pending[self.next_id] = then
        assert self.transport is not None
        self.transport.write(json.dumps({"execute": cmd, "arguments": args,
                                         "id": self.next_id}).encode())


class Client(asyncio.Protocol):
    def __init__(self, vms: dict[str, Qemu]) -> None:
        self.vms = vms
        self.tasks: set[asyncio.Future[None]] = set()   # vm-add's connects (held, not lost)
        self.buf = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport   # type: ignore[assignment]  # uvloop's is no subclass
        version = {"qemu": {"micro": 0, "minor": 0, "major": 0}, "package": ""}
        self.transport.write(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode()
                             + b"\n")

    def data_received(self, data: bytes) -> None:
        msgs, self.buf = split(self.buf + data.decode())
        for req in msgs:
            self.handle(req, lambda value, req=req: self.answer(req, value))

    def answer(self, req: dict[str, Any], value: Any) -> None:
        res = {"return": value}
        if "id" in req:
            res["id"] = req["id"]
        assert self.transport is not None
        self.transport.write(json.dumps(res).encode() + b"\n")

    def handle(self, req: dict[str, Any], done: Callable[[Any], None]) -> None:
        cmd, args = req["execute"], req.get("arguments", {})
        if cmd == "vm-add":
            self.tasks.add(task := asyncio.ensure_future(self.connect(args, done)))
            task.add_done_callback(self.tasks.discard)
        elif cmd == "vm-remove":
            qemu = self.vms.pop(args["name"])
            assert qemu.transport is not None
            qemu.transport.close()
            done({})
        elif cmd == "device-attach":
            self.attach(self.vms[args["vm"]], args["vm"], args["functions"], done)
        elif cmd == "device-detach":
            self.detach(self.vms[args["vm"]], args["ids"], done)
        else:
            done({})

    async def connect(self, args: dict[str, Any], done: Callable[[Any], None]) -> None:
        loop = asyncio.get_running_loop()
        _, qemu = await loop.create_unix_connection(Qemu, args["qmp"])
        await qemu.ready
        self.vms[args["name"]] = qemu
        done({})

    @staticmethod
    def attach(qemu: Qemu, vm: str, functions: list[dict[str, Any]],
               done: Callable[[Any], None]) -> None:
        props = [{"driver": f["driver"], "id": f["id"], "bus": "pci.0", "addr": f"0x10.{i:x}"}
                 for i, f in enumerate(functions)]
        if len(props) > 1:
            props[0]["multifunction"] = True
        left = len(props) - 1

        def last(_: dict[str, Any]) -> None:
            done({"vm": vm, "slot": 16})

        def one_more(_: dict[str, Any]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                qemu.send("device_add", props[0], last)

        if not left:
            qemu.send("device_add", props[0], last)
        for p in props[1:]:
            qemu.send("device_add", p, one_more)

    @staticmethod
    def detach(qemu: Qemu, ids: list[str], done: Callable[[Any], None]) -> None:
        left = len(ids)

        def gone() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                done({})

        for i in ids:
            qemu.deleted[i] = gone
        qemu.send("device_del", {"id": ids[0]}, lambda _: None)


async def main(sock: str) -> None:
    vms: dict[str, Qemu] = {}
    loop = asyncio.get_running_loop()
    srv = await loop.create_unix_server(lambda: Client(vms), sock)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main(sys.argv[1]))
    except ImportError:
        asyncio.run(main(sys.argv[1]))
