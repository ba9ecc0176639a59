"""The host's PCI functions as sysfs shows them, under a configurable root (default /sys).

Only reading here. What a function is (class, ids, multifunction bit from its config header), who
holds it (driver, IOMMU group), its SR-IOV links and reset methods, and what the host uses it for
(network interfaces and their state, block devices, the boot VGA console).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

BDF = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
HEADER_TYPE_OFFSET = 0x0E
MULTIFUNCTION_BIT = 0x80


@dataclass(frozen=True)
class HostFunction:
    address: str                    # "0000:01:00.1"
    class_code: int                 # 0xCCSSPP
    vendor: int
    device: int
    driver: str | None
    iommu_group: int | None
    multifunction: bool
    physfn: str | None = None       # an SR-IOV VF's PF
    virtfns: tuple[str, ...] = ()   # an SR-IOV PF's VFs
    reset_methods: tuple[str, ...] = ()
    net: tuple[tuple[str, str], ...] = ()    # (interface, operstate)
    block: tuple[str, ...] = ()     # block device names below it
    boot_vga: bool = False

    @property
    def slot(self) -> str:
        return self.address[:-2]    # "0000:01:00"

    @property
    def function(self) -> int:
        return int(self.address[-1])

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 16 == 0x06 and (self.class_code >> 8) & 0xFF in (0x04, 0x09)


@dataclass(frozen=True)
class HostPci:
    functions: dict[str, HostFunction] = field(default_factory=dict)
    groups: dict[int, tuple[str, ...]] = field(default_factory=dict)
    mounted_devices: frozenset[str] = frozenset()   # block device names with a mount

    def slots(self) -> dict[str, list[HostFunction]]:
        out: dict[str, list[HostFunction]] = {}
        for f in sorted(self.functions.values(), key=lambda f: f.address):
            out.setdefault(f.slot, []).append(f)
        return out

    def get(self, address: str) -> HostFunction | None:
        return self.functions.get(normalize_address(address))


def normalize_address(address: str) -> str:
    """'1:00.1' or '0000:01:00.1' -> '0000:01:00.1'."""
    a = address.strip().lower()
    if a.count(":") == 1:
        a = "0000:" + a
    dom, bus, rest = a.split(":")
    slot, _, fn = rest.partition(".")
    return f"{int(dom, 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{int(fn or '0', 8)}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _multifunction(dev: Path) -> bool:
    try:
        with (dev / "config").open("rb") as f:
            header = f.read(HEADER_TYPE_OFFSET + 1)
    except OSError:
        return False
    return len(header) > HEADER_TYPE_OFFSET and bool(header[HEADER_TYPE_OFFSET] & MULTIFUNCTION_BIT)


def _net_state(iface: Path) -> str:
    """"up" when the interface is administratively up (IFF_UP), whatever its carrier: the host
    has put it to use. Otherwise the kernel's operstate."""
    flags = _read(iface / "flags")
    if flags is not None and int(flags, 16) & 0x1:
        return "up"
    return _read(iface / "operstate") or "unknown"


def _class_devices(dev: Path, kind: str, depth: int = 6) -> list[Path]:
    """Class devices (``net``, ``block``) in the function's subtree: a NIC's interface sits in
    ``net/`` or deeper (``virtio2/net/eth0``), a disk deeper still (AHCI, NVMe)."""
    found: list[Path] = []
    base = len(dev.parts)
    for here, dirs, _ in os.walk(dev, followlinks=False):
        p = Path(here)
        if len(p.parts) - base >= depth:
            dirs[:] = []
            continue
        if p.name == kind:
            found.extend(p / d for d in sorted(dirs))
            dirs[:] = []
            continue
        # another PCI function's directory is not ours (bridges have children)
        dirs[:] = [d for d in dirs if not BDF.match(d) and d not in ("subsystem", "driver")]
    return found


def read_function(dev: Path) -> HostFunction:
    address = dev.name
    net = tuple((n.name, _net_state(n)) for n in _class_devices(dev, "net"))
    virtfns = tuple(sorted(_link_name(dev / v) or "" for v in os.listdir(dev)
                           if v.startswith("virtfn")))
    group = _link_name(dev / "iommu_group")
    return HostFunction(
        address=address,
        class_code=int(_read(dev / "class") or "0", 16),
        vendor=int(_read(dev / "vendor") or "0", 16),
        device=int(_read(dev / "device") or "0", 16),
        driver=_link_name(dev / "driver"),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        multifunction=_multifunction(dev),
        physfn=_link_name(dev / "physfn"),
        virtfns=virtfns,
        reset_methods=tuple((_read(dev / "reset_method") or "").split()),
        net=net,
        block=tuple(b.name for b in _class_devices(dev, "block")),
        boot_vga=_read(dev / "boot_vga") == "1",
    )


def _mounted(proc_mounts: Path) -> frozenset[str]:
    names = set()
    for line in (_read(proc_mounts) or "").splitlines():
        source = line.split(" ", 1)[0]
        if source.startswith("/dev/"):
            name = source[5:]
            names.add(name)
            names.add(re.sub(r"(p?\d+)$", "", name) if not name.startswith("dm-") else name)
    return frozenset(names)


def read_host(sysfs: Path = Path("/sys"), proc: Path = Path("/proc")) -> HostPci:
    devices = sysfs / "bus" / "pci" / "devices"
    functions = {}
    for name in sorted(os.listdir(devices)) if devices.is_dir() else []:
        if BDF.match(name):
            functions[name] = read_function(devices / name)
    groups: dict[int, tuple[str, ...]] = {}
    groups_dir = sysfs / "kernel" / "iommu_groups"
    for g in os.listdir(groups_dir) if groups_dir.is_dir() else []:
        if g.isdigit():
            groups[int(g)] = tuple(sorted(os.listdir(groups_dir / g / "devices")))
    return HostPci(functions, groups, _mounted(proc / "mounts"))
