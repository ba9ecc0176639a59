"""Planning a partial assignment of a host device's functions. Pure: sysfs facts in, a decision out.

Rules (contract v1.1):
- Guest function numbers are the host's, unless given. If host function 0 is not assigned, the
  lowest assigned function becomes guest function 0 (unless the user maps explicitly).
- ``unassigned`` functions are taken from the host driver and held for the VM (so the IOMMU group
  is viable) but given to no guest.
- IOMMU group viability: every member of each group involved is assigned, unassigned, already on
  vfio-pci/pci-stub or driverless, or a bridge; otherwise ``HostDeviceUnavailable`` naming the
  members in the way.
- A function the host is using (interface up, mounted disk, console) is refused unless ``force`` and
  the config allows it; a function denied by the config's class/vendor:device policy is refused
  with the policy's reason; a function held for another VM is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from qmpfd.errors import Conflict, HostDeviceUnavailable, InvalidRequest, NotFound
from qmpfd.host.sysfs import HostFunction, HostPci, normalize_address
from qmpfd.host.usage import in_use_reasons

VFIO_DRIVERS = frozenset({"vfio-pci", "pci-stub"})


@dataclass(frozen=True)
class HostFunctionRequest:
    id: str
    host: str
    function: int | None = None
    unassigned: bool = False
    managed: bool = True


@dataclass(frozen=True)
class DenyRule:
    """Refuse functions by class (prefix match on 0xCCSSPP hex) or by vendor:device."""

    reason: str
    class_prefix: str | None = None      # "0c07" matches IPMI interfaces
    vendor_device: tuple[int, int] | None = None

    def matches(self, fn: HostFunction) -> bool:
        if self.class_prefix is not None and f"{fn.class_code:06x}".startswith(
                self.class_prefix.lower().removeprefix("0x")):
            return True
        return self.vendor_device is not None and self.vendor_device == (fn.vendor, fn.device)


@dataclass(frozen=True)
class HostAssignment:
    """The decision: which host functions go to which guest function, and what to bind."""

    guest: dict[str, int]                        # request id -> guest function (assigned ones)
    address: dict[str, str]                      # request id -> host address
    bind: tuple[tuple[str, str | None], ...]     # (address, original driver) to move to vfio-pci
    unassigned: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def guest_numbers(requests: Sequence[HostFunctionRequest], host: Mapping[str, HostFunction]
                  ) -> dict[str, int]:
    assigned = [r for r in requests if not r.unassigned]
    explicit = [r.function is not None for r in assigned]
    if any(explicit) and not all(explicit):
        raise InvalidRequest("functions: give 'function' on all assigned host functions or none")
    if all(explicit) and assigned:
        return {r.id: int(r.function) for r in assigned if r.function is not None}
    numbers = {r.id: host[r.id].function for r in assigned}
    if numbers and 0 not in numbers.values():
        lowest = min(numbers, key=numbers.__getitem__)
        numbers[lowest] = 0    # host function 0 stays with the host: the lowest takes its place
    return numbers


def plan_host_assignment(
    requests: Sequence[HostFunctionRequest],
    host: HostPci,
    *,
    vm: str,
    held_by: Mapping[str, str] | None = None,
    deny: Sequence[DenyRule] = (),
    force: bool = False,
    allow_force: bool = False,
) -> HostAssignment:
    held_by = held_by or {}
    by_id: dict[str, HostFunction] = {}
    for i, r in enumerate(requests):
        fn = _usable(f"functions[{i}].host", r.host, host, vm, held_by, deny,
                     force and allow_force, force)
        if any(other.address == fn.address for other in by_id.values()):
            raise InvalidRequest(f"functions[{i}].host: {fn.address} is named twice")
        by_id[r.id] = fn

    _check_groups(by_id.values(), host)
    numbers = guest_numbers(requests, by_id)
    bind = tuple((fn.address, fn.driver) for r in requests if r.managed
                 for fn in [by_id[r.id]] if fn.driver not in VFIO_DRIVERS)
    unmanaged_bad = [by_id[r.id].address for r in requests
                     if not r.managed and by_id[r.id].driver not in VFIO_DRIVERS]
    if unmanaged_bad:
        raise HostDeviceUnavailable(f"functions: {', '.join(unmanaged_bad)} are not bound to "
                                    "vfio-pci and managed is false")
    return HostAssignment(
        guest=numbers,
        address={r.id: by_id[r.id].address for r in requests},
        bind=bind,
        unassigned=tuple(by_id[r.id].address for r in requests if r.unassigned))


def _usable(field: str, given: str, host: HostPci, vm: str, held_by: Mapping[str, str],
            deny: Sequence[DenyRule], forced: bool, force_asked: bool) -> HostFunction:
    """The host function ``given`` names, if this VM may have it; else the reason, naming
    ``field``."""
    try:
        address = normalize_address(given)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: '{given}' is not a PCI address (DDDD:BB:SS.F)") from exc
    fn = host.functions.get(address)
    if fn is None:
        raise NotFound(f"{field}: no PCI function {address} on this host")
    owner = held_by.get(address)
    if owner is not None and owner != vm:
        raise Conflict(f"{field}: {address} is held for VM '{owner}'")
    for rule in deny:
        if rule.matches(fn):
            raise HostDeviceUnavailable(f"{field}: {address} is denied by policy: "
                                        f"{rule.reason}")
    reasons = in_use_reasons(fn, host)
    if reasons and not forced:
        hint = " (force is disabled in the config)" if force_asked else ""
        raise HostDeviceUnavailable(f"{field}: {address} is in use by the host: "
                                    f"{'; '.join(reasons)}{hint}")
    if fn.iommu_group is None:
        raise HostDeviceUnavailable(f"{field}: {address} has no IOMMU group "
                                    "(is the IOMMU enabled, intel_iommu=on / amd_iommu=on?)")
    return fn


def _check_groups(chosen: Iterable[HostFunction], host: HostPci) -> None:
    fns = list(chosen)
    taken = {f.address for f in fns}
    blocking: list[str] = []
    for group in sorted({f.iommu_group for f in fns if f.iommu_group is not None}):
        for member in host.groups.get(group, ()):
            if member in taken:
                continue
            m = host.functions.get(member)
            if m is None or m.is_bridge or m.driver is None or m.driver in VFIO_DRIVERS:
                continue
            blocking.append(f"{member} (driver {m.driver}, IOMMU group {group})")
    if blocking:
        raise HostDeviceUnavailable(
            "IOMMU group not viable: " + ", ".join(blocking) + " would stay with the host; "
            "assign them or list them as unassigned")
