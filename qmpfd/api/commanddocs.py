"""What each command and event does, in prose: the one place the API reference's text comes from
(docs/reference/api.md is generated from this, the request models and the reply models, the
same models ``query-qmp-schema`` describes). scripts/gen_docs.py refuses a command or an event
missing here, so a command cannot be added without its documentation."""

from __future__ import annotations

COMMANDS: dict[str, str] = {
    "qmp_capabilities": (
        "Ends capabilities negotiation, as in QEMU; the first command of every session. qmpfd "
        "offers no capability (`enable` naming one is refused)."),
    "query-version": (
        "qmpfd's version in QEMU's `query-version` shape (`qemu.major/minor/micro`), `package` "
        "saying `qmpfd X.Y.Z`, so QMP tools that read the greeting accept it."),
    "query-commands": "The commands this daemon accepts, as in QEMU.",
    "query-qmp-schema": (
        "Every command with its arguments and reply type, and every event, in QEMU's "
        "introspection format (`SchemaInfo`), generated from the same models as this page."),
    "query-events": (
        "Replays the events after sequence number `since` of boot `boot` from the daemon's "
        "event ring, so a client that reconnects misses nothing. `complete: false` says events "
        "were lost (the ring overflowed, the daemon restarted, or `since` was never issued)."),
    "query-health": (
        "`ok` or `degraded` with the problems: VMs whose link is down, a journal that cannot be "
        "written or was removed, an event loop that lagged. `event-loop` says which loop runs "
        "(`uvloop` or `asyncio`, see `[daemon] event-loop`)."),
    "vm-add": (
        "Adopts a running VM by its QMP socket (`qmp`, below `access.qmp-dirs`) or, for a VM "
        "libvirt runs, by its domain name (`libvirt`). qmpfd reads the machine, QEMU version and "
        "topology and picks the hotplug policy of each bus. A QEMU already managed under another "
        "name or monitor is a `Conflict`."),
    "vm-remove": (
        "Stops managing the VM; QEMU keeps running. Refused with `Conflict` while an attach or "
        "detach is in flight, unless `force`: then each operation settles first and the reply "
        "says how. Host functions held for the VM are reported as still held or given back."),
    "query-vms": (
        "The managed VMs: name, QMP socket, whether connected, arch, machine, policy, QEMU. "
        ""),
    "query-slots": (
        "Every slot of the VM's hotpluggable buses and the occupied slots of the others, with "
        "each function's state: `present`, `queued`, `attaching`, `unplugging` or `orphaned`. "
        "Answered from memory; `refresh` reads QEMU again first."),
    "query-policy": "The VM's hotplug policy per bus: mechanism, timeouts, guest-driven unplug.",
    "device-attach": (
        "Hotplugs 1-8 functions into one slot as one operation: non-zero functions first, "
        "function 0 last with `multifunction`. Any `device_add` refused rolls back what was "
        "added and names the function and QEMU's reason. `dry-run` returns the plan only. "
        "Events: `SLOT_ATTACHED`, `SLOT_ATTACH_FAILED`."),
    "device-attach-xml": (
        "`device-attach` from libvirt-style `<hostdev>`/`<interface>`/`<controller>` XML, "
        "several functions in one `<devices>` element."),
    "function-add": (
        "Incremental attach: a non-zero function waits in qmpfd (never in QEMU) and reserves its "
        "slot; function 0 flushes the queue as one `device-attach`. Event `FUNCTION_QUEUED`."),
    "query-pending": (
        "The queues of `function-add`: functions waiting for function 0, and when they "
        "expire."),
    "pending-cancel": "Drops a queue and returns it. Event `PENDING_CANCELLED`.",
    "device-detach": (
        "Hot-unplugs a whole slot (named by all its ids, by `bus` and `slot`, or `whole-slot`) and "
        "returns once QEMU reported every function deleted. On timeout the slot stays "
        "`unplugging` and a late deletion completes it; a second detach of it is a `Conflict` "
        "(on native PCIe a second press cancels the first). Event `SLOT_DETACHED`."),
    "query-operations": (
        "Operations in flight, from the journal; with `ended`, also those that failed after their "
        "request was answered."),
    "vm-qmp": (
        "A raw QMP command to the VM, only if `access.qmp-passthrough` is on: it bypasses every "
        "check qmpfd makes. Full access only."),
    "query-host-devices": (
        "The host's PCI functions with their IOMMU groups, drivers, whether in use and whether "
        "assignable (the deny list says why not). Full access only."),
}

EVENTS: dict[str, str] = {
    "SLOT_ATTACHED": "A slot's functions are all in QEMU `{vm, bus, slot, ids}`.",
    "SLOT_ATTACH_FAILED": "An attach failed and was rolled back `{vm, bus, slot, ids, reason}`.",
    "SLOT_DETACHED": "A slot is empty after a detach `{vm, bus, slot, ids}`.",
    "SLOT_DETACH_FAILED": (
        "An unplug failed after its request was answered; the slot is present again. "
        ""),
    "SLOT_ORPHANED": (
        "QEMU holds non-zero functions of a slot without function 0 (left by something else). "
        ""),
    "SLOT_EJECTED": "QEMU emptied a slot nobody asked to (a guest's own eject).",
    "FUNCTION_QUEUED": "A non-zero function waits in qmpfd for function 0.",
    "PENDING_CANCELLED": "A queue was dropped by `pending-cancel`.",
    "PENDING_EXPIRED": "A queue expired (`timeouts.pending-expiry`).",
    "VM_DISCONNECTED": "qmpfd lost the VM's QMP connection `{vm, qmp}`.",
    "VM_RECONNECTED": "qmpfd reconnected to the VM `{vm, qmp}`.",
}

#: What an argument member means wherever it appears, unless its model says otherwise with a
#: ``#:`` comment above the field (models know the command-specific meaning).
MEMBERS: dict[str, str] = {
    "vm": "the VM's name as given to `vm-add` (or its SMBIOS UUID)",
    "name": "the VM's name: letters, digits, `.`, `_`, `-`",
    "libvirt": "the libvirt domain's name, for a VM libvirt runs (instead of `qmp`)",
    "functions": "the slot's functions, 1-8: `{id, driver, function?, properties?}` emulated, "
                 "`{id, host, function?, unassigned?, managed?, properties?}` from the host",
    "bus": "the bus to plug into (default: qmpfd picks a free hotpluggable slot)",
    "slot": "the slot on `bus` (0-31)",
    "dry-run": "plan and answer, change nothing",
    "timeout": "seconds to wait for QEMU and the guest (default: the policy's)",
    "force": "attach: take a host function the host is using (`host.allow-force`); "
             "detach: return once `device_del` is accepted, without waiting for the guest",
    "xml": "libvirt-style device XML: one device, or several in `<devices>`",
    "multifunction-only": "list only host devices with more than one function",
    "id": "the function's QEMU device id (a letter first)",
    "driver": "the QEMU device model (`-device help`)",
    "function": "the guest function number, 0-7",
    "properties": "QEMU properties of the device, as JSON values or `-device` strings",
    "host": "the host function's PCI address (`0000:3b:00.1`)",
    "unassigned": "a host function held away from the host but not given to the guest",
    "managed": "bind the host function to vfio-pci and back (false: the operator does it)",
    "ids": "all the ids of the slot's functions",
    "whole-slot": "detach the whole slot of the ids named, even if they are not all of it",
    "command": "the QMP command to send to the VM",
    "arguments": "its arguments",
}
