"""Tenants: peers admitted by an ``[[access.tenants]]`` rule act only on the VMs its patterns
match. Checked per request before the handler runs (a refusal names the rule), and the answers
that list several VMs (query-vms, -pending, -operations, -events, the event stream) show only
theirs. Host devices and raw QMP stay with full-access peers: they reach past any one VM."""

from __future__ import annotations

from typing import Any

from qmpfd.access.policy import Scope
from qmpfd.errors import QmpfdError
from qmpfd.vm.registry import VmRegistry

FULL_ACCESS_ONLY = {"vm-qmp": "raw QMP", "query-host-devices": "host devices",
                    "device-attach-xml": "host devices"}
VM_ARGUMENT = {"vm-add": "name", "vm-remove": "name"}   # others name the VM in "vm"


class AccessDenied(QmpfdError):
    """A tenant asked for something outside its rule (GenericError, as QEMU would)."""


def check(scope: Scope, command: str, args: dict[str, Any], vms: VmRegistry) -> None:
    if command in FULL_ACCESS_ONLY:
        raise AccessDenied(scope.refusal(f"{command} ({FULL_ACCESS_ONLY[command]})"))
    functions = args.get("functions")
    if isinstance(functions, list) and any(isinstance(f, dict) and "host" in f
                                           for f in functions):
        raise AccessDenied(scope.refusal("assigning host functions"))
    value = args.get(VM_ARGUMENT.get(command, "vm"))
    if not isinstance(value, str):
        return                                   # a command about no VM in particular
    name = value
    if command != "vm-add":
        try:
            name = vms.get(value).name           # a UUID counts as the VM it names
        except QmpfdError:
            name = value
    if not scope.allows(name):
        raise AccessDenied(scope.refusal(f"VM '{value}'"))


def visible(scope: Scope, command: str, result: Any) -> Any:
    """The part of a listing the tenant may see."""
    if command == "query-vms":
        return [v for v in result if scope.allows(v["name"])]
    if command in ("query-pending", "query-operations"):
        return [x for x in result if scope.allows(x["vm"])]
    if command == "query-events":
        return {**result, "events": [e for e in result["events"]
                                     if scope.allows(e["data"].get("vm"))]}
    return result
