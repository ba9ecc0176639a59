"""``qmpfctl``: the command-line client of qmpfd.

It is a plain QMP client (``qemu.qmp.QMPClient``) of qmpfd's socket. Tables by default, ``--json``
for scripts. Exit status: 0 success, 1 error reply (or qmpfd unreachable), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

DEFAULT_SOCKET = os.environ.get("QMPFD_SOCKET", "/run/qmpfd/qmpfd.sock")


class CliError(Exception):
    def __init__(self, error_class: str, desc: str, status: int = 1) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
        self.status = status


# -- output -------------------------------------------------------------------------------
def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 9] -> '0x03-0x05, 0x09'."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].endswith(f"{n - 1:#04x}"):
            first = out[-1].split("-")[0]
            out[-1] = f"{first}-{n:#04x}"
        else:
            out.append(f"{n:#04x}")
    return ", ".join(out)


def host_tree(slots: list[dict[str, Any]]) -> str:
    """Like ``lspci -t``, one slot per branch, with groups, drivers and in-use reasons."""
    lines = []
    for s in slots:
        fns = s["functions"]
        mf = " multifunction" if len(fns) > 1 or (fns and fns[0]["multifunction"]) else ""
        lines.append(f"{s['slot']}{mf}")
        for i, f in enumerate(fns):
            branch = "└─" if i == len(fns) - 1 else "├─"
            name = f["device-name"] or f["device"]
            vendor = f["vendor-name"] or f["vendor"]
            group = "-" if f["iommu-group"] is None else f["iommu-group"]
            notes = [f"driver {f['driver'] or '-'}", f"group {group}"]
            if f["held-by"]:
                notes.append(f"held by {f['held-by']}")
            if f["denied"]:
                notes.append(f"denied: {f['denied']}")
            notes += [f"IN USE: {r}" for r in f["in-use"]]
            lines.append(f" {branch} .{f['function']} [{f['class']}] {vendor} {name} "
                         f"({', '.join(notes)})")
    return "\n".join(lines)


def render(command: str, result: Any) -> str:
    if command == "query-vms":
        return table([(v["name"], "yes" if v["connected"] else "NO", v["arch"], v["machine"],
                       v["policy"], v["qmp"]) for v in result],
                     ("NAME", "CONNECTED", "ARCH", "MACHINE", "POLICY", "QMP"))
    if command == "query-slots":
        rows = [(s["bus"], f"{s['slot']:#04x}", "yes" if s["hotpluggable"] else "no",
                 f["function"], f["id"], f["driver"], f["state"])
                for s in result for f in s["functions"]]
        free: dict[str, list[int]] = {}
        for s in result:
            if not s["functions"]:
                free.setdefault(s["bus"], []).append(s["slot"])
        summary = [f"free hotpluggable slots on {bus}: {ranges(slots)}"
                   for bus, slots in free.items()]
        return "\n".join([table(rows, ("BUS", "SLOT", "HOTPLUG", "FN", "ID", "DRIVER", "STATE")),
                          *summary])
    if command == "query-pending":
        return table([(p["vm"], p["bus"], p["slot"], f["function"], f["id"], f["driver"],
                       p["expires-in"]) for p in result for f in p["functions"]],
                     ("VM", "BUS", "SLOT", "FN", "ID", "DRIVER", "EXPIRES-IN"))
    if command in ("device-attach", "function-add") and isinstance(result, dict):
        if result.get("queued"):
            return (f"queued on {result['bus']} slot {result['slot']}: "
                    + ", ".join(f"{f['function']}={f['id']}" for f in result["functions"]))
        head = "plan (dry run)" if result.get("dry-run") else "attached"
        lines = [f"{head}: {result['vm']} {result['bus']} slot {result['slot']:#04x} "
                 f"({result['policy']})"]
        lines += [f"  function {f['function']}: {f['id']}" for f in result["functions"]]
        if result.get("dry-run"):
            lines += ["steps:"] + [f"  {json.dumps(s)}" for s in result["steps"]]
            lines += ["rollback:"] + [f"  {json.dumps(s)}" for s in result["rollback"]]
        return "\n".join(lines)
    if command == "query-host-devices":
        return host_tree(result)
    if command == "device-detach":
        return (f"detached: {result['vm']} {result['bus']} slot {result['slot']:#04x} "
                f"({', '.join(result['ids'])}) in {result['seconds']} s")
    if command == "vm-add":
        return (f"adopted {result['name']}: {result['arch']} {result['machine']} "
                f"QEMU {result['qemu']}, policy {result['policy']}")
    if command == "vm-remove" and result:
        lines = [f"settled: {s['kind']} {s['operation'] or ''} {s['bus']} slot {s['slot']:#04x} "
                 f"({', '.join(s['ids'])}): {s['outcome']}" for s in result.get("settled", [])]
        if result.get("host-released"):
            lines.append("removed; its QEMU is gone, host functions given back: "
                         + ", ".join(result["host-released"]))
        elif result.get("host-held"):
            lines.append("removed; its QEMU still runs, host functions stay held: "
                         + ", ".join(result["host-held"]))
        else:
            lines.append("removed")
        return "\n".join(lines)
    if result == {}:
        return "ok"
    return json.dumps(result, indent=2)


# -- talking to qmpfd -----------------------------------------------------------------------
class Spinner:
    """A progress indicator on stderr while a slow command runs (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._task: asyncio.Task[None] | None = None

    async def _spin(self) -> None:
        for ch in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{self.label} {ch}")
            sys.stderr.flush()
            await asyncio.sleep(0.2)

    def __enter__(self) -> Spinner:
        if sys.stderr.isatty():
            self._task = asyncio.get_running_loop().create_task(self._spin())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            sys.stderr.write("\r" + " " * (len(self.label) + 2) + "\r")


async def call(sock: str, command: str, args: dict[str, Any] | None,
               label: str | None = None) -> Any:
    client = QMPClient("qmpfctl")
    try:
        await client.connect(sock)
    except (QMPError, OSError) as exc:
        raise CliError("GenericError", f"cannot reach qmpfd at {sock}: {exc}") from exc
    try:
        with Spinner(label or f"{command} ..."):
            return await client.execute(command, args)
    except ExecuteError as exc:
        raise CliError(exc.error_class, str(exc)) from exc
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def follow_events(sock: str, as_json: bool) -> None:
    client = QMPClient("qmpfctl")
    try:
        await client.connect(sock)
    except (QMPError, OSError) as exc:
        raise CliError("GenericError", f"cannot reach qmpfd at {sock}: {exc}") from exc
    listener = EventListener()
    client.register_listener(listener)
    async for ev in listener:
        if as_json:
            print(json.dumps(dict(ev)), flush=True)
        else:
            data: dict[str, Any] = dict(ev)
            ts = data["timestamp"]
            print(f"{ts['seconds']}.{ts['microseconds']:06d} {ev['event']} "
                  f"{json.dumps(ev.get('data', {}))}", flush=True)


def load_attach_request(vm: str, source: str) -> tuple[str, dict[str, Any]]:
    """(command, arguments) for a JSON or libvirt-style XML attach file."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    if text.lstrip().startswith("<"):
        return "device-attach-xml", {"vm": vm, "xml": text}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError("InvalidRequest", f"{source}: not JSON: {exc}", status=2) from exc
    if isinstance(doc, list):
        doc = {"functions": doc}
    if not isinstance(doc, dict):
        raise CliError("InvalidRequest", f"{source}: expected an object or a list of functions",
                       status=2)
    return "device-attach", {**doc, "vm": vm}


# -- argument parsing -----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpfctl", description="Client of the qmpfd daemon.")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--json", action="store_true", help="print JSON replies")
    sub = p.add_subparsers(dest="cmd", required=True)

    vm = sub.add_parser("vm", help="adopt, list and drop VMs").add_subparsers(dest="vmcmd",
                                                                              required=True)
    a = vm.add_parser("add", help="adopt a running QEMU by its QMP socket")
    a.add_argument("name")
    a.add_argument("qmp_socket")
    vm.add_parser("list", help="list managed VMs")
    r = vm.add_parser("remove", help="stop managing a VM (QEMU keeps running)")
    r.add_argument("name")
    r.add_argument("--force", action="store_true",
                   help="let operations in flight settle first instead of refusing")

    s = sub.add_parser("slots", help="the VM's PCI slots and their functions")
    s.add_argument("vm")
    s = sub.add_parser("policy", help="the VM's hotplug policy and timeouts")
    s.add_argument("vm")

    at = sub.add_parser("attach", help="attach a whole device (JSON file or - for stdin)")
    at.add_argument("vm")
    at.add_argument("file")
    at.add_argument("--bus")
    at.add_argument("--slot", type=lambda v: int(v, 0))
    at.add_argument("--dry-run", action="store_true")
    at.add_argument("--timeout", type=float)

    fa = sub.add_parser("add-function", help="queue one function (function 0 flushes the slot)")
    fa.add_argument("vm")
    fa.add_argument("id")
    fa.add_argument("driver")
    fa.add_argument("bus")
    fa.add_argument("slot", type=lambda v: int(v, 0))
    fa.add_argument("function", type=int)
    fa.add_argument("--property", "-p", action="append", default=[], metavar="KEY=VALUE")

    de = sub.add_parser("detach", help="detach a whole slot by its device ids")
    de.add_argument("vm")
    de.add_argument("ids", nargs="+")
    de.add_argument("--whole-slot", action="store_true")
    de.add_argument("--timeout", type=float)

    pe = sub.add_parser("pending", help="queued functions, or cancel a queue")
    pe.add_argument("vm", nargs="?")
    pe.add_argument("--cancel", nargs=2, metavar=("BUS", "SLOT"))

    sub.add_parser("events", help="follow the event stream")
    h = sub.add_parser("host", help="host PCI devices").add_subparsers(dest="hostcmd",
                                                                       required=True)
    hl = h.add_parser("list", help="host PCI functions as a tree: slots, functions, IOMMU "
                                   "groups, drivers, why the host uses them")
    hl.add_argument("--multifunction-only", action="store_true")
    sub.add_parser("version", help="qmpfd's version")
    return p


def request_of(ns: argparse.Namespace) -> tuple[str, dict[str, Any] | None, str | None]:
    """The (command, arguments, progress label) an invocation stands for."""
    if ns.cmd == "vm":
        if ns.vmcmd == "add":
            return "vm-add", {"name": ns.name, "qmp": str(Path(ns.qmp_socket).absolute())}, None
        if ns.vmcmd == "remove":
            return "vm-remove", {"name": ns.name, **({"force": True} if ns.force else {})}, None
        return "query-vms", None, None
    if ns.cmd == "slots":
        return "query-slots", {"vm": ns.vm}, None
    if ns.cmd == "policy":
        return "query-policy", {"vm": ns.vm}, None
    if ns.cmd == "attach":
        command, args = load_attach_request(ns.vm, ns.file)
        for key, val in (("bus", ns.bus), ("slot", ns.slot), ("timeout", ns.timeout)):
            if val is not None:
                args[key] = val
        if ns.dry_run:
            args["dry-run"] = True
        return command, args, "attaching ..."
    if ns.cmd == "add-function":
        props: dict[str, Any] = {}
        for kv in ns.property:
            key, sep, val = kv.partition("=")
            if not sep:
                raise CliError("InvalidRequest", f"--property {kv}: expected KEY=VALUE", 2)
            props[key] = val
        return "function-add", {"vm": ns.vm, "id": ns.id, "driver": ns.driver, "bus": ns.bus,
                                "slot": ns.slot, "function": ns.function,
                                "properties": props}, "adding ..."
    if ns.cmd == "detach":
        args = {"vm": ns.vm, "ids": ns.ids}
        if ns.whole_slot:
            args["whole-slot"] = True
        if ns.timeout is not None:
            args["timeout"] = ns.timeout
        return "device-detach", args, "waiting for the guest to release the slot ..."
    if ns.cmd == "pending":
        if ns.cancel:
            if not ns.vm:
                raise CliError("InvalidRequest", "pending --cancel needs the VM", 2)
            return "pending-cancel", {"vm": ns.vm, "bus": ns.cancel[0],
                                      "slot": int(ns.cancel[1], 0)}, None
        return "query-pending", ({"vm": ns.vm} if ns.vm else {}), None
    if ns.cmd == "host":
        return "query-host-devices", ({"multifunction-only": True} if ns.multifunction_only
                                      else {}), None
    return "query-version", None, None


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.cmd == "events":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(follow_events(ns.socket, ns.json))
            return 0
        command, args, label = request_of(ns)
        result = asyncio.run(call(ns.socket, command, args, label))
    except CliError as exc:
        print(f"qmpfctl: {exc.error_class}: {exc.desc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"qmpfctl: GenericError: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if ns.json else render(command, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
