"""Every command of ``query-qmp-schema`` sent through the command layer as a tenant, as a tenant
whose rule a reload removed (same session), and as a peer no rule admits. A tenant reaches its
own VM and nothing beyond it; the other two reach nothing; every refusal is audited."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qmpfd.access.peer import Peer
from qmpfd.access.policy import AccessPolicy
from qmpfd.api.tenancy import AccessDenied, Reach
from qmpfd.config import AccessConfig
from qmpfd.errors import QmpfdError
from tests.unit.harness import Api

TENANT_GID = 4321
#: Arguments each command is tried with (on the tenant's own VM "v" where it names one).
ARGS: dict[str, dict[str, Any]] = {
    "query-version": {}, "query-commands": {}, "query-qmp-schema": {}, "query-events": {},
    "query-health": {}, "query-vms": {}, "query-pending": {}, "query-operations": {},
    "vm-add": {"name": "v2", "qmp": "TMP/v2.qmp"}, "vm-remove": {"name": "v"},
    "query-slots": {"vm": "v"}, "query-policy": {"vm": "v"},
    "device-attach": {"vm": "v", "functions": [{"id": "t0", "driver": "virtio-rng-pci"}]},
    "function-add": {"vm": "v", "id": "t1", "driver": "virtio-rng-pci", "bus": "pci.0",
                     "slot": 9, "function": 1},
    "pending-cancel": {"vm": "v", "bus": "pci.0", "slot": 9},
    "device-detach": {"vm": "v", "ids": ["t0"]},
    "vm-qmp": {"vm": "v", "command": "query-status"},
    "device-attach-xml": {"vm": "v", "xml": "<hostdev/>"},
    "query-host-devices": {},
}


def policy(tmp_path: Path, tenants: bool) -> AccessPolicy:
    rules = [{"group": TENANT_GID, "vms": ["v", "v2"], "qmp-dirs": [str(tmp_path)]}]
    return AccessPolicy.from_config(AccessConfig.model_validate({
        "users": ["root"], "groups": [], "qmp-dirs": [str(tmp_path)],
        "tenants": rules if tenants else []}))


@pytest.fixture
async def api(tmp_path: Path) -> Api:
    a = Api(tmp_path)
    a.commands.access = policy(tmp_path, tenants=True)
    return a


async def outcome(api: Api, name: str) -> str:
    args = {k: v.replace("TMP", str(api.audit_path.parent)) if isinstance(v, str) else v
            for k, v in ARGS[name].items()}
    try:
        await api.commands.dispatch(name, args, api.session)
    except AccessDenied:
        return "denied"
    except QmpfdError:
        return "reached"        # past the access check: refused for another reason
    return "reached"


async def test_every_command_as_tenant_revoked_tenant_and_stranger(api: Api,
                                                                    tmp_path: Path) -> None:
    schema = await api("query-qmp-schema")
    commands = {e["name"] for e in schema if e.get("meta-type") == "command"}
    commands.discard("qmp_capabilities")          # the session's, before any command
    assert commands == set(ARGS), "a command of the schema is not tried here"
    api.session.peer = Peer(pid=1, uid=5555, gid=TENANT_GID)
    as_tenant = {n: await outcome(api, n) for n in sorted(ARGS)}
    admin_only = {n for n, c in api.commands.table.items() if c.reach is Reach.ADMIN}
    assert admin_only == {"vm-qmp", "device-attach-xml", "query-host-devices"}
    assert {n for n, o in as_tenant.items() if o == "denied"} == admin_only
    api.commands.access = policy(tmp_path, tenants=False)        # a reload removed the rule
    assert {n: await outcome(api, n) for n in sorted(ARGS)} == dict.fromkeys(ARGS, "denied")
    api.session.peer = Peer(pid=1, uid=6666, gid=6666)           # nobody admits this one
    api.commands.access = policy(tmp_path, tenants=True)
    assert {n: await outcome(api, n) for n in sorted(ARGS)} == dict.fromkeys(ARGS, "denied")
    for _ in range(100):
        lines = api.audit_path.read_text().splitlines() if api.audit_path.exists() else []
        if len([ln for ln in lines if '"AccessDenied"' in ln]) >= len(admin_only) + 2 * len(ARGS):
            break
        await asyncio.sleep(0.02)
    refused = [json.loads(ln) for ln in lines if '"AccessDenied"' in ln]
    assert len(refused) == len(admin_only) + 2 * len(ARGS)     # every refusal audited
    assert {r["uid"] for r in refused} == {5555, 6666}


async def test_a_tenant_sees_only_its_vms_and_others_are_not_named(api: Api) -> None:
    api.session.peer = Peer(pid=1, uid=5555, gid=TENANT_GID)
    assert [v["name"] for v in await api("query-vms")] == ["v"]
    api.commands.access = AccessPolicy.from_config(AccessConfig.model_validate({
        "users": ["root"], "groups": [], "tenants": [{"group": TENANT_GID, "vms": ["w*"]}]}))
    assert await api("query-vms") == []
    health = await api("query-health")
    assert health.get("vms", []) == []


async def test_a_tenant_cannot_keep_more_requests_in_flight_than_its_rule_allows(
        api: Api, tmp_path: Path) -> None:
    api.commands.access = AccessPolicy.from_config(AccessConfig.model_validate({
        "users": ["root"], "groups": [],
        "tenants": [{"group": TENANT_GID, "vms": ["v"], "requests": 1}]}))
    gate = asyncio.Event()
    real = api.h.qemu.execute

    async def slow(cmd: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None, on_return: Any = None) -> Any:
        if cmd == "device_add":
            await gate.wait()
        return await real(cmd, args, timeout, on_return)
    api.h.qemu.execute = slow  # type: ignore[method-assign]
    tenant = Peer(pid=1, uid=5555, gid=TENANT_GID)
    api.session.peer = tenant
    first = asyncio.create_task(api.commands.dispatch("device-attach", dict(
        ARGS["device-attach"]), api.session))
    await asyncio.sleep(0.05)
    with pytest.raises(AccessDenied, match="too many requests in flight"):
        await api.commands.dispatch("query-vms", {}, api.session)
    root = type(api.session)(peer=Peer(pid=1, uid=0, gid=0))
    assert await api.commands.dispatch("query-vms", {}, root)   # full access: not counted
    gate.set()
    await first
    assert await api.commands.dispatch("query-vms", {}, api.session)   # its turn again
