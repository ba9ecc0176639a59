"""Tenants: peers admitted by an ``[[access.tenants]]`` rule act only on the VMs its patterns
match. An allowlist: every command declares what it reaches (:class:`Reach`), and a command
that declares nothing is for full-access peers only. Checked per request, against the access
policy in force at that moment (a reload that narrows or removes a rule applies to open
sessions at once). What a tenant gets back is filtered to its VMs, errors included: a message
naming a VM it may not see names "another VM" instead."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

from qmpfd.access.policy import Scope
from qmpfd.errors import QmpfdError
from qmpfd.vm.registry import VmRegistry


class Reach(enum.Enum):
    VM = "vm"            # acts on or reads one VM, named by an argument
    READ = "read"        # reads about every VM: answered with the tenant's own only
    ADMIN = "admin"      # reaches past any one VM (host devices, raw QMP): full access only


VM_ARGUMENT = {"vm-add": "name", "vm-remove": "name"}   # others name the VM in "vm"


class AccessDenied(QmpfdError):
    """A peer asked for something outside what it may do (GenericError, as QEMU would)."""


def check(scope: Scope, reach: Reach, command: str, args: dict[str, Any],
          vms: VmRegistry) -> None:
    """Refuse (naming the rule) what ``scope`` may not do with ``command``."""
    if reach is Reach.ADMIN:
        raise AccessDenied(scope.refusal(f"{command} (for full-access peers only)"))
    functions = args.get("functions")
    if isinstance(functions, list) and any(isinstance(f, dict) and "host" in f
                                           for f in functions):
        raise AccessDenied(scope.refusal("assigning host functions"))
    if reach is Reach.READ:
        return
    value = args.get(VM_ARGUMENT.get(command, "vm"))
    if not isinstance(value, str):
        raise AccessDenied(scope.refusal(f"{command} without a VM of its own"))
    name = value
    if command != "vm-add":
        try:
            name = vms.get(value).name           # a UUID counts as the VM it names
        except QmpfdError:
            name = value
    if not scope.allows(name):
        raise AccessDenied(scope.refusal(f"VM '{value}'"))
    if command == "vm-add":
        _check_adoption(scope, args)


def _check_adoption(scope: Scope, args: dict[str, Any]) -> None:
    """A tenant adopts only QEMU sockets below the directories its rule grants (none unless
    it says), and no libvirt domain: the global ``qmp-dirs`` hold every tenant's QEMUs."""
    if args.get("libvirt") is not None:
        raise AccessDenied(scope.refusal("adopting a libvirt domain"))
    qmp = args.get("qmp")
    if not isinstance(qmp, str):
        return                                   # the argument check names what is missing
    resolved = Path(qmp).resolve()
    if not any(resolved.is_relative_to(d) for d in scope.qmp_dirs):
        granted = ", ".join(str(d) for d in scope.qmp_dirs) or "none"
        raise AccessDenied(scope.refusal(f"adopting {resolved} (this rule's qmp-dirs: "
                                         f"{granted})"))


def visible(scope: Scope, command: str, result: Any) -> Any:
    """The part of a listing the tenant may see."""
    if command == "query-vms":
        return [v for v in result if scope.allows(v["name"])]
    if command in ("query-pending", "query-operations"):
        return [x for x in result if scope.allows(x["vm"])]
    if command == "query-events":
        return {**result, "events": [e for e in result["events"]
                                     if scope.allows(e["data"].get("vm"))]}
    if command == "query-health":
        theirs = [v for v in result.get("vms", []) if scope.allows(v["name"])]
        problems = [p for p in result.get("problems", [])
                    if not p.startswith("VM ") or any(p.startswith(f"VM {v['name']}:")
                                                      for v in theirs)]
        return {**result, "vms": theirs, "problems": problems}
    return result


_VM_NAME = re.compile(r"VM '([^']*)'")


def redact(scope: Scope, exc: QmpfdError) -> QmpfdError:
    """The error as the tenant may see it: another tenant's VM is not named."""
    desc = _VM_NAME.sub(lambda m: m.group(0) if scope.allows(m.group(1)) else "another VM",
                        exc.desc)
    if desc != exc.desc:
        exc.desc = desc
        exc.args = (desc,)
    return exc
