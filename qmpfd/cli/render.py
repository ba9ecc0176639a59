"""What qmpfctl prints: tables and sentences for people (``--json`` prints the replies as they
are). One slot notation everywhere: ``0x05``."""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from typing import Any

from qmpfd.client import models


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


def slot(n: int) -> str:
    """The one slot notation of qmpfctl's output (and what ``--slot`` accepts, with decimal)."""
    return f"{n:#04x}"


def _device_value(value: Any) -> str:
    """A device_add value as -device writes it (booleans on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def step_text(step: dict[str, Any]) -> str:
    """{"execute": "device_add", "arguments": {...}} -> 'device_add driver=e1000 id=n0 ...'."""
    args = " ".join(f"{k}={_device_value(v)}" for k, v in step.get("arguments", {}).items())
    return f"{step['execute']} {args}".strip()


def render_policy(p: dict[str, Any]) -> str:
    t = p["timeouts"]
    lines = [f"{p['vm']}: policy {p['policy']}"
             + ("" if p.get("multifunction", True) else " (no multifunction hotplug)"),
             f"  timeouts: {t['plug']:g} s per device_add, {t['unplug']:g} s for an unplug",
             "  unplug needs the guest: " + ("yes" if p.get("guest-driven-unplug") else "no")]
    buses = p.get("buses") or []
    if buses:
        lines.append(table([(b["bus"], b["mechanism"], b["policy"]) for b in buses],
                           ("BUS", "MECHANISM", "POLICY")))
    return "\n".join(lines)


#: Replies shown as sentences or tables; the others are printed as the JSON they are.
READABLE = {"query-vms", "query-slots", "query-pending", "pending-cancel", "device-attach",
            "device-attach-xml", "function-add", "device-detach", "vm-add", "vm-remove",
            "query-version"}


def render(command: str, result: Any) -> str:
    """The reply of ``command`` for people. Replies with a model (qmpfd.client.models.RETURNS)
    are read through it, the same description the client and the schema use."""
    model = models.RETURNS.get(command)
    if model is not None and result != {} and command in READABLE:
        if typing.get_origin(model) is list:
            (item,) = typing.get_args(model)
            return _render_list(command, [item.model_validate(r) for r in result])
        return _render_one(command, model.model_validate(result))
    if command == "query-policy":
        return render_policy(result)
    if command == "query-host-devices":
        return host_tree(result)
    if result == {}:
        return "ok"
    return json.dumps(result, indent=2)


def _render_list(command: str, items: list[Any]) -> str:
    if command == "query-vms":
        return table([(v.name, "yes" if v.connected else "NO", v.arch, v.machine, v.policy,
                       v.qmp) for v in items],
                     ("NAME", "CONNECTED", "ARCH", "MACHINE", "POLICY", "QMP"))
    if command == "query-slots":
        rows = [(s.bus, slot(s.slot), "yes" if s.hotpluggable else "no",
                 f.function, f.id, f.driver, f.state) for s in items for f in s.functions]
        free: dict[str, list[int]] = {}
        for s in items:
            if not s.functions:
                free.setdefault(s.bus, []).append(s.slot)
        summary = [f"free hotpluggable slots on {bus}: {ranges(slots)}"
                   for bus, slots in free.items()]
        return "\n".join([table(rows, ("BUS", "SLOT", "HOTPLUG", "FN", "ID", "DRIVER", "STATE")),
                          *summary])
    if command == "query-pending":
        if not items:
            return "no queued functions"
        return table([(p.vm, p.bus, slot(p.slot), f["function"], f["id"], f["driver"],
                       f"{p.expires_in or 0:.0f} s") for p in items for f in p.functions],
                     ("VM", "BUS", "SLOT", "FN", "ID", "DRIVER", "EXPIRES-IN"))
    raise AssertionError(f"no list rendering for {command}")


def _render_one(command: str, r: Any) -> str:
    if isinstance(r, models.Attached):
        return _attached(r)
    if isinstance(r, models.Detached):
        waited = (f", {r.waited_for_guest} s of it waiting for a busy guest"
                  if r.waited_for_guest else "")
        if r.unplugging:
            return (f"unplug requested: {r.vm} {r.bus} slot {slot(r.slot)} "
                    f"({', '.join(r.ids)}); the slot stays 'unplugging' until the guest "
                    "releases it")
        return (f"detached: {r.vm} {r.bus} slot {slot(r.slot)} ({', '.join(r.ids)}) "
                f"in {r.seconds} s{waited}")
    if isinstance(r, models.Pending):       # pending-cancel
        return (f"cancelled the queue of {r.vm} {r.bus} slot {slot(r.slot)}: "
                + ", ".join(f["id"] for f in r.functions))
    if isinstance(r, models.Vm):            # vm-add
        return f"adopted {r.name}: {r.arch} {r.machine} QEMU {r.qemu}, policy {r.policy}"
    if isinstance(r, models.Removed):
        return _removed(r)
    assert isinstance(r, models.Version), command
    return r.package


def _attached(r: models.Attached) -> str:
    if r.queued:
        return (f"queued on {r.bus} slot {slot(r.slot)}: "
                + ", ".join(f"{f.function}={f.id}" for f in r.functions))
    head = "plan (dry run)" if r.dry_run else "attached"
    lines = [f"{head}: {r.vm} {r.bus} slot {slot(r.slot)} ({r.policy})"]
    lines += [f"  function {f.function}: {f.id}" for f in r.functions]
    host = r.host or {}
    if host.get("bind"):
        lines.append("  host functions to vfio-pci: " + ", ".join(host["bind"]))
    if host.get("unassigned"):
        lines.append("  held back (unassigned): " + ", ".join(host["unassigned"]))
    if r.dry_run:
        lines += ["steps:"] + [f"  {n}. {step_text(s)}" for n, s in enumerate(r.steps, 1)]
        lines += ["rollback if a step fails:"] + [f"  {step_text(s)}" for s in r.rollback]
    return "\n".join(lines)


def _removed(r: models.Removed) -> str:
    lines = [f"settled: {s['kind']} {s['operation'] or ''} {s['bus']} slot {slot(s['slot'])} "
             f"({', '.join(s['ids'])}): {s['outcome']}" for s in r.settled]
    if r.host_released:
        lines.append("removed; its QEMU is gone, host functions given back: "
                     + ", ".join(r.host_released))
    elif r.host_held:
        lines.append("removed; its QEMU still runs, host functions stay held: "
                     + ", ".join(r.host_held))
    else:
        lines.append("removed")
    return "\n".join(lines)
