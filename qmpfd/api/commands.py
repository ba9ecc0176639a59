"""The commands of the contract: argument models in, JSON-able values out.

Each handler is registered with its argument model, so ``query-commands`` and the dispatcher read
one table, and no handler sees arguments pydantic has not validated.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from qmpfd.access.audit import AuditLog
from qmpfd.access.policy import AccessPolicy
from qmpfd.api import models as m
from qmpfd.api import replies, schema, tenancy, wire
from qmpfd.api.eventlog import EventLog
from qmpfd.api.session import Session, early_reply
from qmpfd.api.tenancy import AccessDenied
from qmpfd.api.xml import libvirt_bus, parse_devices_xml
from qmpfd.client import models as r
from qmpfd.errors import CommandNotFound, InvalidRequest, QmpfdError, Unsupported
from qmpfd.host.assign import HostFunctionRequest
from qmpfd.host.manager import HostDevices
from qmpfd.vm import removal
from qmpfd.vm.registry import VmRegistry
from qmpfd.vm.results import RemoveResult

log = logging.getLogger("qmpfd.api")

Handler = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    model: type[BaseModel]
    handler: Handler
    changes_state: bool
    #: what a tenant may reach through it (undeclared: full-access peers only)
    reach: tenancy.Reach = tenancy.Reach.ADMIN
    #: the reply model (qmpfd.client.models), a list of one, or None for free-form JSON
    returns: Any = None


class Commands:
    def __init__(self, vms: VmRegistry, access: AccessPolicy, audit: AuditLog,
                 host: HostDevices, events: EventLog | None = None) -> None:
        self.vms = vms
        self.access = access
        self.audit = audit
        self.host = host
        self.events = events or EventLog(16)
        #: the daemon's health report (set by the daemon; query-health)
        self.health: Callable[[], dict[str, Any]] = lambda: {"status": "ok"}
        self.table: dict[str, Command] = {}
        #: requests in flight per tenant rule (full-access peers are not counted)
        self._in_flight: dict[str, int] = {}
        reg, vm, read = self._register, tenancy.Reach.VM, tenancy.Reach.READ
        reg("query-version", m.NoArgs, self.query_version, False, read)
        reg("query-commands", m.NoArgs, self.query_commands, False, read)
        reg("query-qmp-schema", m.NoArgs, self.query_qmp_schema, False, read)
        reg("query-events", m.QueryEventsArgs, self.query_events, False, read)
        reg("query-health", m.NoArgs, self.query_health, False, read)
        reg("vm-add", m.VmAddArgs, self.vm_add, True, vm)
        reg("vm-remove", m.VmRemoveArgs, self.vm_remove, True, vm)
        reg("query-vms", m.NoArgs, self.query_vms, False, read)
        reg("query-slots", m.QuerySlotsArgs, self.query_slots, False, vm)
        reg("query-policy", m.VmRef, self.query_policy, False, vm)
        reg("device-attach", m.DeviceAttachArgs, self.device_attach, True, vm)
        reg("function-add", m.FunctionAddArgs, self.function_add, True, vm)
        reg("query-pending", m.QueryPendingArgs, self.query_pending, False, read)
        reg("pending-cancel", m.SlotRef, self.pending_cancel, True, vm)
        reg("device-detach", m.DeviceDetachArgs, self.device_detach, True, vm)
        reg("query-operations", m.QueryOperationsArgs, self.query_operations, False, read)
        # Raw QMP and host devices reach past any one VM: full access only (undeclared).
        reg("vm-qmp", m.VmQmpArgs, self.vm_qmp, True)
        reg("device-attach-xml", m.DeviceAttachXmlArgs, self.device_attach_xml, True)
        reg("query-host-devices", m.QueryHostDevicesArgs, self.query_host_devices, False)

    def _register(self, name: str, model: type[BaseModel], handler: Handler,
                  changes_state: bool, reach: tenancy.Reach = tenancy.Reach.ADMIN) -> None:
        self.table[name] = Command(name, model, handler, changes_state, reach,
                                   r.RETURNS.get(name))

    async def dispatch(self, name: str, args: dict[str, Any], session: Session) -> Any:
        cmd = self.table.get(name)
        if cmd is None:
            raise CommandNotFound(f"The command {name} has not been found")
        # Decided per request, by the policy in force now: a reload that removes or narrows
        # a rule applies to sessions already open.
        refusal = self.access.admit(session.peer)
        if refusal is not None:
            self._refused(session, name, args, AccessDenied(refusal))
        scope = self.access.scope(session.peer)
        if scope is None:
            return await self._run(cmd, name, args, session)
        if (early := early_reply()) is not None:
            early.allowed = False      # a tenant's reply is its view of the value (below)
        try:
            tenancy.check(scope, cmd.reach, name, args, self.vms)
            if self._in_flight.get(scope.rule, 0) >= scope.requests:
                raise AccessDenied(f"too many requests in flight for {scope.rule} (its "
                                   f"requests = {scope.requests}); wait for one to end")
        except AccessDenied as exc:
            self._refused(session, name, args, exc)
        self._in_flight[scope.rule] = self._in_flight.get(scope.rule, 0) + 1
        try:
            return tenancy.visible(scope, name, await self._run(cmd, name, args, session))
        except QmpfdError as exc:
            raise tenancy.redact(scope, exc) from None
        finally:
            self._in_flight[scope.rule] -= 1

    def _refused(self, session: Session, name: str, args: dict[str, Any],
                 exc: AccessDenied) -> NoReturn:
        """Audit a refused request (whatever the command) and raise the refusal."""
        log.warning("request refused", extra={"command": name, "peer_uid": session.peer.uid,
                                              "reason": exc.desc})
        self.audit.record(session.peer, name, args, "AccessDenied")
        raise exc

    async def _run(self, cmd: Command, name: str, args: dict[str, Any],
                   session: Session) -> Any:
        if not cmd.changes_state:
            return await cmd.handler(m.parse_args(cmd.model, args))
        if log.isEnabledFor(logging.DEBUG):     # its arguments are not made otherwise
            log.debug("request", extra={"command": name, "peer_uid": session.peer.uid})
        outcome = "ok"
        try:
            return await cmd.handler(m.parse_args(cmd.model, args))
        except QmpfdError as exc:
            outcome = exc.error_class
            raise
        except BaseException:
            outcome = "internal-error"
            raise
        finally:
            self.audit.record_soon(session.peer, name, args, outcome)

    # -- introspection ---------------------------------------------------------------------
    async def query_version(self, _: m.NoArgs) -> dict[str, Any]:
        # QEMU's shape (contract v1.2), plus v1's "qmpfd" member for older clients.
        reply = wire.version()
        return {**reply, "qmpfd": dict(reply["qemu"])}

    async def query_health(self, _: m.NoArgs) -> dict[str, Any]:
        return self.health()

    async def query_events(self, a: m.QueryEventsArgs) -> dict[str, Any]:
        return replies.replay(self.events.replay(a.since, a.boot))

    async def query_qmp_schema(self, _: m.NoArgs) -> list[dict[str, Any]]:
        return schema.schema((c.name, c.model, c.returns) for c in self.table.values())

    async def query_commands(self, _: m.NoArgs) -> list[dict[str, str]]:
        return [{"name": n} for n in sorted([*self.table, "qmp_capabilities"])]

    # -- VMs -------------------------------------------------------------------------------
    async def vm_add(self, a: m.VmAddArgs) -> dict[str, Any]:
        if a.libvirt is not None:
            info = await self.vms.add(a.name, None, libvirt=a.libvirt)
        else:
            info = await self.vms.add(a.name, self.access.check_qmp_path(Path(str(a.qmp))))
        return replies.vm_added(info)

    async def vm_qmp(self, a: m.VmQmpArgs) -> Any:
        if not self.access.passthrough:
            raise Unsupported("vm-qmp: raw QMP passthrough is disabled "
                              "(config access.qmp-passthrough)")
        return await self.vms.get(a.vm).passthrough(a.command, a.arguments)

    async def vm_remove(self, a: m.VmRemoveArgs) -> dict[str, Any]:
        """Stop managing the VM. Refused while an operation is in flight unless ``force``,
        which lets each settle first and reports what it came to. Host functions held for it
        stay held while its QEMU may still use them; when its QEMU is verifiably gone they go
        back to their host drivers now, since no later reconnect would ever give them back."""
        vm = self.vms.get(a.name)
        flights = removal.in_flight(vm)
        settled: list[removal.Settled] = []
        if flights:
            if not a.force:
                raise removal.refusal(a.name, flights)
            settled = await removal.settle(vm, flights, removal.settle_limit(vm))
        gone = await vm.qemu_gone()
        await self.vms.remove(a.name)
        held = self.host.held_for(a.name)
        if not held:
            return replies.vm_removed(RemoveResult(settled=settled))
        if gone:
            return replies.vm_removed(RemoveResult(
                host_released=await self.host.release_vm(a.name), settled=settled))
        log.warning("VM removed while its QEMU holds host functions; they stay held",
                    extra={"vm": a.name, "host": held})
        return replies.vm_removed(RemoveResult(host_held=held, settled=settled))

    async def query_vms(self, _: m.NoArgs) -> list[dict[str, Any]]:
        return [replies.vm(vm.info()) for vm in self.vms.all()]

    async def query_slots(self, a: m.QuerySlotsArgs) -> list[dict[str, Any]]:
        vm = self.vms.get(a.vm)
        if a.refresh:
            await vm.read_again()
        return replies.slots(vm.slots())

    async def query_policy(self, a: m.VmRef) -> dict[str, Any]:
        vm = self.vms.get(a.vm)
        policies = vm.policies()
        headline = vm.policy_name()
        per_bus = [{"bus": b.name, "mechanism": b.mechanism, "policy": policies[b.name].name}
                   for b in vm.buses() if b.hotpluggable]
        chosen = next((p for p in policies.values() if p.name == headline), None)
        base = chosen.describe() if chosen else {"policy": headline}
        return {"vm": vm.name, **base, "buses": per_bus}

    # -- hotplug ---------------------------------------------------------------------------
    async def device_attach(self, a: m.DeviceAttachArgs) -> dict[str, Any]:
        vm = self.vms.get(a.vm)
        # Properties typed from QEMU's own introspection before anything is held or plugged.
        fields = {f.id: f"functions[{i}]." for i, f in enumerate(a.functions)}
        if not a.has_host:
            specs = await vm.typed(a.specs(), fields)
            reply = replies.PreparedAttached(vm.name)
            return reply.reply(await vm.attach(specs, bus=a.bus, slot=a.slot,
                                               dry_run=a.dry_run, timeout=a.timeout,
                                               while_qemu_works=reply.prepare,
                                               on_plugged=(reply.plugged if reply.answers_early
                                                           else None)))
        requests = [HostFunctionRequest(f.id, f.host, f.function, f.unassigned, f.managed)
                    for f in a.functions if f.host is not None]
        assignment = await self.host.plan(requests, vm.name, a.force)
        specs = await vm.typed(a.specs(assignment.guest, assignment.address), fields)
        if not specs:
            raise InvalidRequest("functions: every host function is unassigned; nothing would "
                                 "reach the guest")
        host_info = {"bind": [addr for addr, _ in assignment.bind],
                     "unassigned": list(assignment.unassigned)}
        if a.dry_run:
            result = await vm.attach(specs, bus=a.bus, slot=a.slot, dry_run=True)
            return {**replies.attached(result), "host": host_info}
        ids = [f.id for f in a.functions]
        result = await vm.attach(specs, bus=a.bus, slot=a.slot, timeout=a.timeout,
                                 acquire=lambda: self.host.acquire(assignment, vm.name, ids))
        return {**replies.attached(result), "host": host_info}

    async def device_attach_xml(self, a: m.DeviceAttachXmlArgs) -> dict[str, Any]:
        doc = parse_devices_xml(a.xml)
        args: dict[str, Any] = {"vm": a.vm, "functions": doc.functions,
                                "dry-run": a.dry_run, "force": a.force}
        bus = (libvirt_bus(self.vms.get(a.vm).buses(), doc.bus_number)
               if doc.bus_number is not None else None)
        for name, given, from_xml in (("bus", a.bus, bus), ("slot", a.slot, doc.slot)):
            if given is not None and from_xml is not None and given != from_xml:
                raise InvalidRequest(f"{name}: {given} differs from the XML's <address> "
                                     f"({from_xml})")
            if given is not None or from_xml is not None:
                args[name] = given if given is not None else from_xml
        return await self.device_attach(m.parse_args(m.DeviceAttachArgs, args))

    async def query_host_devices(self, a: m.QueryHostDevicesArgs) -> list[dict[str, Any]]:
        return await self.host.query(a.multifunction_only)

    async def function_add(self, a: m.FunctionAddArgs) -> dict[str, Any]:
        vm = self.vms.get(a.vm)
        (spec,) = await vm.typed([a.spec()], {a.id: ""})
        return replies.function_added(await vm.function_add(spec, a.bus, a.slot))

    async def query_pending(self, a: m.QueryPendingArgs) -> list[dict[str, Any]]:
        vms = [self.vms.get(a.vm)] if a.vm else self.vms.all()
        return [replies.pending(vm.name, p) for vm in vms for p in vm.queued()]

    async def pending_cancel(self, a: m.SlotRef) -> dict[str, Any]:
        return replies.pending(a.vm, await self.vms.get(a.vm).pending_cancel(a.bus, a.slot))

    async def device_detach(self, a: m.DeviceDetachArgs) -> dict[str, Any]:
        result = await self.vms.get(a.vm).detach(ids=a.ids, bus=a.bus, slot=a.slot,
                                                 whole_slot=a.whole_slot, timeout=a.timeout,
                                                 force=a.force)
        return replies.detached(result)

    async def query_operations(self, a: m.QueryOperationsArgs) -> list[dict[str, Any]]:
        if a.vm:
            self.vms.get(a.vm)  # NotFound for an unknown VM
        running = [replies.operation(op) for op in self.vms.journal.ops.values()
                   if a.vm is None or op.vm == a.vm]
        if not a.ended:
            return running
        failed = [replies.failed_operation(vm.name, e) for vm in self.vms.all()
                  if a.vm is None or vm.name == a.vm for e in vm.failed]
        return running + failed
