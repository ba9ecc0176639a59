"""Which QEMU versions qmpfd drives, and why that is the floor.

QEMU 7.2 (Debian 12) is the oldest release proven here with real guests on every machine. The one
older QEMU Debian still ships, 5.2 (Debian 11), attaches on ``pc`` but on ``q35`` with native PCIe
hotplug its guest never released a 4-function slot (the unplug timed out), so a detach would hang
half-way: it is refused at ``vm-add`` with the minimum named, rather than half working. The 6.x
releases (Ubuntu 22.04, RHEL 8) are not in Debian's archive and could not be run here.
"""

from __future__ import annotations

from qmpfd.errors import Unsupported
from qmpfd.qemu.introspect import VmIdentity

MINIMUM = (7, 2)


def check_supported(ident: VmIdentity) -> None:
    """Refuse a QEMU older than :data:`MINIMUM`, naming it."""
    if ident.qemu_version[:2] < MINIMUM:
        raise Unsupported(f"QEMU {ident.qemu} is older than qmpfd supports: the minimum is QEMU "
                          f"{MINIMUM[0]}.{MINIMUM[1]} (Debian 12); older releases lose "
                          "multifunction unplugs on q35")
