"""What qmpfctl prints: tables and sentences for people (``--json`` prints the replies as they
are). One slot notation everywhere: ``0x05``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


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


def render(command: str, result: Any) -> str:
    if command == "query-vms":
        return table([(v["name"], "yes" if v["connected"] else "NO", v["arch"], v["machine"],
                       v["policy"], v["qmp"]) for v in result],
                     ("NAME", "CONNECTED", "ARCH", "MACHINE", "POLICY", "QMP"))
    if command == "query-slots":
        rows = [(s["bus"], slot(s["slot"]), "yes" if s["hotpluggable"] else "no",
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
        if not result:
            return "no queued functions"
        return table([(p["vm"], p["bus"], slot(p["slot"]), f["function"], f["id"], f["driver"],
                       f"{p['expires-in']:.0f} s") for p in result for f in p["functions"]],
                     ("VM", "BUS", "SLOT", "FN", "ID", "DRIVER", "EXPIRES-IN"))
    if command == "pending-cancel":
        return (f"cancelled the queue of {result['vm']} {result['bus']} slot "
                f"{slot(result['slot'])}: " + ", ".join(f["id"] for f in result["functions"]))
    if command == "query-policy":
        return render_policy(result)
    if command == "query-version":
        return str(result.get("package") or f"qmpfd {result}")
    if command in ("device-attach", "device-attach-xml", "function-add") \
            and isinstance(result, dict):
        if result.get("queued"):
            return (f"queued on {result['bus']} slot {slot(result['slot'])}: "
                    + ", ".join(f"{f['function']}={f['id']}" for f in result["functions"]))
        head = "plan (dry run)" if result.get("dry-run") else "attached"
        lines = [f"{head}: {result['vm']} {result['bus']} slot {slot(result['slot'])} "
                 f"({result['policy']})"]
        lines += [f"  function {f['function']}: {f['id']}" for f in result["functions"]]
        host = result.get("host") or {}
        if host.get("bind"):
            lines.append("  host functions to vfio-pci: " + ", ".join(host["bind"]))
        if host.get("unassigned"):
            lines.append("  held back (unassigned): " + ", ".join(host["unassigned"]))
        if result.get("dry-run"):
            lines += ["steps:"] + [f"  {n}. {step_text(s)}"
                                   for n, s in enumerate(result["steps"], 1)]
            lines += ["rollback if a step fails:"] + [f"  {step_text(s)}"
                                                      for s in result["rollback"]]
        return "\n".join(lines)
    if command == "query-host-devices":
        return host_tree(result)
    if command == "device-detach":
        waited = (f", {result['waited-for-guest']} s of it waiting for a busy guest"
                  if result.get("waited-for-guest") else "")
        if result.get("unplugging"):
            return (f"unplug requested: {result['vm']} {result['bus']} slot "
                    f"{slot(result['slot'])} ({', '.join(result['ids'])}); the slot stays "
                    "'unplugging' until the guest releases it")
        return (f"detached: {result['vm']} {result['bus']} slot {slot(result['slot'])} "
                f"({', '.join(result['ids'])}) in {result['seconds']} s{waited}")
    if command == "vm-add":
        return (f"adopted {result['name']}: {result['arch']} {result['machine']} "
                f"QEMU {result['qemu']}, policy {result['policy']}")
    if command == "vm-remove" and result:
        lines = [f"settled: {s['kind']} {s['operation'] or ''} {s['bus']} slot {slot(s['slot'])} "
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


