"""From a request and the VM's topology to a :class:`Plan`: the slot, the ordered QMP steps, and
how to roll back. Pure code: no QEMU, so ``dry-run`` costs nothing and every rule is unit-tested.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qmpfd.errors import InvalidRequest, Unsupported
from qmpfd.hotplug.choice import choose_slot
from qmpfd.hotplug.policies.base import Policy, SlotMember
from qmpfd.hotplug.slots import SlotTable
from qmpfd.hotplug.spec import FunctionSpec as FunctionSpec  # re-exported: callers' name

MAX_FUNCTIONS = 8
#: device_add arguments qmpfd sets itself; a request may not pass them as properties.
RESERVED_PROPERTIES = frozenset({"id", "driver", "bus", "addr", "multifunction"})


@dataclass(frozen=True)
class Step:
    """One QMP command of a plan, and the function it concerns."""

    execute: str
    arguments: Mapping[str, Any]
    id: str
    function: int

    def as_json(self) -> dict[str, Any]:
        return {"execute": self.execute, "arguments": dict(self.arguments)}


@dataclass(frozen=True)
class Plan:
    bus: str
    slot: int
    policy: Policy
    functions: tuple[FunctionSpec, ...]
    steps: tuple[Step, ...]

    @property
    def multifunction(self) -> bool:
        return len(self.functions) > 1

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.functions]

    def rollback_steps(self, added: Sequence[str]) -> list[Step]:
        """device_del steps that take back the functions in ``added`` (ids already in QEMU)."""
        by_id = {f.id: f for f in self.functions}
        members = [SlotMember(i, by_id[i].function) for i in added]
        if not members:
            return []
        return [Step("device_del", {"id": i}, i, by_id[i].function)
                for i in self.policy.rollback_targets(members)]


def check_functions(functions: Sequence[FunctionSpec]) -> None:
    """The request-level rules of the contract, each error naming the field at fault."""
    if not 1 <= len(functions) <= MAX_FUNCTIONS:
        raise InvalidRequest(
            f"functions: between 1 and {MAX_FUNCTIONS} functions, got {len(functions)}")
    seen_ids: dict[str, int] = {}
    seen_fn: dict[int, int] = {}
    for i, f in enumerate(functions):
        if f.id in seen_ids:
            raise InvalidRequest(f"functions[{i}].id: '{f.id}' is used twice "
                                 f"(also functions[{seen_ids[f.id]}])")
        seen_ids[f.id] = i
        if not 0 <= f.function <= 7:
            raise InvalidRequest(f"functions[{i}].function: must be 0-7, got {f.function}")
        if f.function in seen_fn:
            raise InvalidRequest(f"functions[{i}].function: function {f.function} is given twice "
                                 f"(also functions[{seen_fn[f.function]}])")
        seen_fn[f.function] = i
        bad = RESERVED_PROPERTIES & set(f.properties)
        if bad:
            raise InvalidRequest(f"functions[{i}].properties.{sorted(bad)[0]}: set by qmpfd, "
                                 "not allowed in properties")
    if 0 not in seen_fn:
        raise InvalidRequest("functions: no function 0; a slot without function 0 is invisible "
                             "to the guest")


def plan_attach(
    table: SlotTable,
    functions: Sequence[FunctionSpec],
    policy_of: Mapping[str, Policy],
    *,
    bus: str | None = None,
    slot: int | None = None,
    from_top: bool = False,
    now: float = 0.0,
) -> Plan:
    """Plan an attach against the VM's slot table (which knows every slot and id taken by QEMU,
    a queue or an operation in flight). ``policy_of`` maps bus name to its policy; ``now``
    (monotonic) tells which slots are still held back from reuse."""
    check_functions(functions)
    table.check_new_ids([(f"functions[{i}].id", f.id) for i, f in enumerate(functions)])
    multi = len(functions) > 1
    bus_name, number = choose_slot(
        table, bus, slot, from_top,
        suits=(lambda b: policy_of[b.name].multifunction) if multi else None, now=now)
    target = table.bus(bus_name)
    policy = policy_of[target.name]
    if len(functions) > 1 and not policy.multifunction:
        raise Unsupported(policy.unsupported_reason or
                          f"bus '{target.name}' cannot take a multifunction device")
    by_fn = {f.function: f for f in functions}
    steps = []
    for fn in policy.plug_order(list(by_fn)):
        f = by_fn[fn]
        args: dict[str, Any] = {"driver": f.driver, "id": f.id, "bus": target.name,
                                "addr": f"{number:#04x}.{fn:#x}" if multi else f"{number:#04x}"}
        if multi and fn == 0:
            # A JSON boolean: QEMU >= 8 type-checks device_add and refuses the string "on".
            args["multifunction"] = True
        args.update(f.properties)
        steps.append(Step("device_add", args, f.id, fn))
    ordered = tuple(sorted(functions, key=lambda f: f.function))
    return Plan(target.name, number, policy, ordered, tuple(steps))
