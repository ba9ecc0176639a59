"""Why the host is using a function: reasons that make handing it to a guest dangerous."""

from __future__ import annotations

from qmpfd.host.sysfs import HostFunction, HostPci


def in_use_reasons(fn: HostFunction, host: HostPci) -> list[str]:
    reasons = []
    for iface, state in fn.net:
        if state == "up":
            reasons.append(f"network interface {iface} is up")
    for dev in fn.block:
        if dev in host.mounted_devices:
            reasons.append(f"block device {dev} is mounted")
    if fn.boot_vga:
        reasons.append("it is the boot VGA device (the host console)")
    return reasons
