"""qmpfctl's command line: the argument parser and the request each invocation stands for."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from qmpfd import __version__
from qmpfd.cli.client import load_attach_request
from qmpfd.cli.errors import CliError

DEFAULT_SOCKET = os.environ.get("QMPFD_SOCKET", "/run/qmpfd/qmpfd.sock")


def slot_number(value: str) -> int:
    """A slot as qmpfctl prints it (0x05) or in decimal (5)."""
    try:
        n = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a slot number (0x05 or 5)") from None
    if not 0 <= n <= 31:
        raise argparse.ArgumentTypeError(f"slot {value}: PCI slots are 0x00-0x1f")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qmpfctl", description="Client of the qmpfd daemon: "
                                "multifunction PCI hotplug and unplug in QEMU VMs.")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    p.add_argument("--json", action="store_true",
                   help="print replies as JSON, and errors as the QMP error object")
    p.add_argument("--version", action="version", version=f"qmpfctl {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _vm_commands(sub)
    _hotplug_commands(sub)
    sub.add_parser("events", help="follow the event stream")
    h = sub.add_parser("host", help="host PCI devices").add_subparsers(dest="hostcmd",
                                                                       required=True)
    hl = h.add_parser("list", help="host PCI functions as a tree: slots, functions, IOMMU "
                                   "groups, drivers, why the host uses them")
    hl.add_argument("--multifunction-only", action="store_true")
    sub.add_parser("version", help="qmpfd's version")
    co = sub.add_parser("completion", help="print the shell completion script")
    co.add_argument("shell", choices=["bash", "zsh"])
    return p


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _vm_commands(sub: Subparsers) -> None:
    vm = sub.add_parser("vm", help="adopt, list and drop VMs").add_subparsers(dest="vmcmd",
                                                                              required=True)
    a = vm.add_parser("add", help="adopt a running QEMU by its QMP socket, or a VM libvirt "
                                  "runs by its domain (--libvirt)")
    a.add_argument("name")
    a.add_argument("qmp_socket", nargs="?")
    a.add_argument("--libvirt", metavar="DOMAIN", help="a libvirt domain (qemu:///system)")
    vm.add_parser("list", help="list managed VMs")
    r = vm.add_parser("remove", help="stop managing a VM (QEMU keeps running)")
    r.add_argument("name")
    r.add_argument("--force", action="store_true",
                   help="let operations in flight settle first instead of refusing")

    s = sub.add_parser("slots", help="the VM's PCI slots and their functions")
    s.add_argument("vm")
    s = sub.add_parser("policy", help="the VM's hotplug policy and timeouts")
    s.add_argument("vm")


def _hotplug_commands(sub: Subparsers) -> None:
    at = sub.add_parser("attach", help="attach a whole device (JSON file or - for stdin)")
    at.add_argument("vm")
    at.add_argument("file")
    at.add_argument("--bus")
    at.add_argument("--slot", type=slot_number)
    at.add_argument("--dry-run", action="store_true")
    at.add_argument("--timeout", type=float)

    fa = sub.add_parser("add-function", help="queue one function (function 0 flushes the slot)")
    fa.add_argument("vm")
    fa.add_argument("id")
    fa.add_argument("driver")
    fa.add_argument("bus")
    fa.add_argument("slot", type=slot_number)
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


Request = tuple[str, dict[str, Any] | None, str | None]


def request_of(ns: argparse.Namespace) -> Request:
    """The (command, arguments, progress label) an invocation stands for."""
    if ns.cmd in _REQUESTS:
        return _REQUESTS[ns.cmd](ns)
    if ns.cmd in ("slots", "policy"):
        return f"query-{ns.cmd}", {"vm": ns.vm}, None
    if ns.cmd == "host":
        return "query-host-devices", ({"multifunction-only": True} if ns.multifunction_only
                                      else {}), None
    return "query-version", None, None


def _vm_request(ns: argparse.Namespace) -> Request:
    if ns.vmcmd == "add":
        if (ns.qmp_socket is None) == (ns.libvirt is None):
            raise CliError("InvalidRequest", "vm add: give the QMP socket or --libvirt "
                                             "DOMAIN", 2)
        if ns.libvirt:
            return "vm-add", {"name": ns.name, "libvirt": ns.libvirt}, None
        return "vm-add", {"name": ns.name, "qmp": str(Path(ns.qmp_socket).absolute())}, None
    if ns.vmcmd == "remove":
        return "vm-remove", {"name": ns.name, **({"force": True} if ns.force else {})}, None
    return "query-vms", None, None


def _attach_request(ns: argparse.Namespace) -> Request:
    command, args = load_attach_request(ns.vm, ns.file)
    for key, val in (("bus", ns.bus), ("slot", ns.slot), ("timeout", ns.timeout)):
        if val is not None:
            args[key] = val
    if ns.dry_run:
        args["dry-run"] = True
    return command, args, "attaching ..."


def _function_add_request(ns: argparse.Namespace) -> Request:
    props: dict[str, Any] = {}
    for kv in ns.property:
        key, sep, val = kv.partition("=")
        if not sep:
            raise CliError("InvalidRequest", f"--property {kv}: expected KEY=VALUE", 2)
        props[key] = val
    return "function-add", {"vm": ns.vm, "id": ns.id, "driver": ns.driver, "bus": ns.bus,
                            "slot": ns.slot, "function": ns.function,
                            "properties": props}, "adding ..."


def _detach_request(ns: argparse.Namespace) -> Request:
    args: dict[str, Any] = {"vm": ns.vm, "ids": ns.ids}
    if ns.whole_slot:
        args["whole-slot"] = True
    if ns.timeout is not None:
        args["timeout"] = ns.timeout
    return "device-detach", args, "waiting for the guest to release the slot ..."


def _pending_request(ns: argparse.Namespace) -> Request:
    if not ns.cancel:
        return "query-pending", ({"vm": ns.vm} if ns.vm else {}), None
    if not ns.vm:
        raise CliError("InvalidRequest", "pending --cancel needs the VM", 2)
    try:
        number = slot_number(ns.cancel[1])
    except argparse.ArgumentTypeError as exc:
        raise CliError("InvalidRequest", f"--cancel: {exc}", 2) from None
    return "pending-cancel", {"vm": ns.vm, "bus": ns.cancel[0], "slot": number}, None


_REQUESTS: dict[str, Callable[[argparse.Namespace], Request]] = {
    "vm": _vm_request, "attach": _attach_request, "add-function": _function_add_request,
    "detach": _detach_request, "pending": _pending_request}
