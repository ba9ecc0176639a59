"""The host inventory for query-host-devices, and the deny rules from the config."""

from __future__ import annotations

from typing import Any

from qmpfd.config import HostConfig
from qmpfd.host.assign import DenyRule
from qmpfd.host.pciids import PciIds
from qmpfd.host.sysfs import HostPci
from qmpfd.host.usage import in_use_reasons


def deny_rules(cfg: HostConfig) -> list[DenyRule]:
    rules = []
    for d in cfg.deny:
        vd = None
        if d.vendor_device:
            v, _, dev = d.vendor_device.partition(":")
            vd = (int(v, 16), int(dev, 16))
        rules.append(DenyRule(d.reason, class_prefix=d.class_prefix, vendor_device=vd))
    return rules


def describe(host: HostPci, ids: PciIds, held_by: dict[str, str], multifunction_only: bool,
             deny: list[DenyRule]) -> list[dict[str, Any]]:
    out = []
    for slot, fns in host.slots().items():
        if multifunction_only and len(fns) < 2:
            continue
        functions = []
        for f in fns:
            group = f.iommu_group
            denied = next((r.reason for r in deny if r.matches(f)), None)
            functions.append({
                "address": f.address, "function": f.function,
                "class": f"0x{f.class_code:06x}", "class-name": ids.class_name(f.class_code),
                "vendor": f"0x{f.vendor:04x}", "vendor-name": ids.vendor(f.vendor),
                "device": f"0x{f.device:04x}", "device-name": ids.device(f.vendor, f.device),
                "driver": f.driver, "iommu-group": group,
                "group-members": list(host.groups.get(group, ())) if group is not None else [],
                "multifunction": f.multifunction, "physfn": f.physfn, "virtfns": list(f.virtfns),
                "reset-methods": list(f.reset_methods), "in-use": in_use_reasons(f, host),
                "held-by": held_by.get(f.address), "denied": denied,
            })
        out.append({"slot": slot, "functions": functions})
    return out
