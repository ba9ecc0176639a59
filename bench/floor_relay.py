"""The floor under qmpfd's CPU per attach: a relay with nothing but a Unix socket, JSON and
qemu.qmp, the same wire as qmpfd's (greeting, qmp_capabilities, vm-add, device-attach,
device-detach, vm-remove), no journal, no checks, no events, no audit. What it costs per attach
on a machine is what any asyncio daemon relaying through qemu.qmp costs there.

    python bench/floor_relay.py SOCKET       (bench.ab_cpu --floor runs it as a third arm)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from qemu.qmp import QMPClient


async def main(sock: str) -> None:
    vms: dict[str, QMPClient] = {}
    deleted: dict[str, asyncio.Future[None]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def pump(q: QMPClient) -> None:
        async for ev in q.events:
            if ev["event"] == "DEVICE_DELETED":
                data: dict[str, Any] = ev["data"]   # type: ignore[assignment]
                f = deleted.pop(str(data.get("device", "")), None)
                if f and not f.done():
                    f.set_result(None)

    async def handle(req: dict[str, Any]) -> Any:
        cmd, args = req["execute"], req.get("arguments", {})
        if cmd == "qmp_capabilities":
            return {}
        if cmd == "vm-add":
            q = QMPClient(args["name"])
            await q.connect(args["qmp"])
            vms[args["name"]] = q
            task = asyncio.create_task(pump(q))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return {}
        if cmd == "vm-remove":
            await vms.pop(args["name"]).disconnect()
            return {}
        q = vms[args["vm"]]
        if cmd == "device-attach":
            fs = args["functions"]
            for i, f in reversed(list(enumerate(fs))):
                props = {"driver": f["driver"], "id": f["id"], "bus": "pci.0",
                         "addr": f"0x10.{i:x}"}
                if i == 0 and len(fs) > 1:
                    props["multifunction"] = True
                await q.execute("device_add", props)
            return {"vm": args["vm"], "slot": 16}
        if cmd == "device-detach":
            ids = args["ids"]
            loop = asyncio.get_running_loop()
            futs = [deleted.setdefault(i, loop.create_future()) for i in ids]
            await q.execute("device_del", {"id": ids[0]})
            await asyncio.wait_for(asyncio.gather(*futs), 30)
            return {}
        return {}

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        version = {"qemu": {"micro": 0, "minor": 0, "major": 0}, "package": ""}
        w.write(json.dumps({"QMP": {"version": version, "capabilities": []}}).encode() + b"\n")
        dec = json.JSONDecoder()
        buf = ""
        while chunk := await r.read(65536):
            buf = (buf + chunk.decode()).lstrip()
            while buf:
                try:
                    req, end = dec.raw_decode(buf)
                except ValueError:
                    break
                buf = buf[end:].lstrip()
                try:
                    res = {"return": await handle(req)}
                except Exception as e:  # a relay answers every request
                    res = {"error": {"class": "GenericError", "desc": repr(e)}}
                if "id" in req:
                    res["id"] = req["id"]
                w.write(json.dumps(res).encode() + b"\n")
    srv = await asyncio.start_unix_server(client, sock)
    async with srv:
        await srv.serve_forever()

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
