"""The command layer (qmpfd.api.commands) over one VM of the scripted QEMU: what each command
answers, that bad arguments are refused naming the field and change nothing, and the audit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qmpfd.errors import CommandNotFound, InvalidRequest, NotFound, QmpfdError
from tests.unit.harness import FUNCS, Api


@pytest.fixture
async def api(tmp_path: Path) -> Api:
    return Api(tmp_path)


async def test_attach_query_detach(api: Api) -> None:
    placed = await api("device-attach", {"vm": "v", "functions": FUNCS})
    assert [f["id"] for f in placed["functions"]] == ["c0", "c1", "c2"]
    assert api.in_qemu() == {"c0", "c1", "c2"}
    slots = await api("query-slots", {"vm": "v"})
    mine = [s for s in slots if s["slot"] == placed["slot"] and s["bus"] == placed["bus"]]
    assert sorted(f["id"] for f in mine[0]["functions"]) == ["c0", "c1", "c2"]
    assert await api("query-operations", {"vm": "v"}) == []
    gone = await api("device-detach", {"vm": "v", "ids": ["c0", "c1", "c2"]})
    assert sorted(gone["ids"]) == ["c0", "c1", "c2"] and api.in_qemu() == set()
    for _ in range(50):     # the audit writer is a task of its own, never waited for
        audit = api.audit_path.read_text()
        if "device-detach" in audit:
            break
        await asyncio.sleep(0.02)
    assert "device-attach" in audit and "device-detach" in audit


async def test_dry_run_changes_nothing(api: Api) -> None:
    plan = await api("device-attach", {"vm": "v", "functions": FUNCS, "dry-run": True})
    assert plan["dry-run"] is True and plan["steps"] and api.in_qemu() == set()
    assert not api.h.qemu.sent


@pytest.mark.parametrize(("args", "field"), [
    ({"vm": "v", "functions": [{"id": "bad id!", "driver": "e1000"}]}, "functions[0].id"),
    ({"vm": "v", "functions": []}, "functions"),
    ({"vm": "v", "functions": FUNCS, "slot": 99, "bus": "pci.0"}, "slot"),
    ({"vm": "v", "functions": FUNCS, "bogus": 1}, "bogus"),
])
async def test_bad_arguments_name_the_field_and_change_nothing(
        api: Api, args: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace("]", r"\]")):
        await api("device-attach", args)
    assert api.in_qemu() == set() and not api.h.journal.ops


async def test_unknown_command_and_unknown_vm(api: Api) -> None:
    with pytest.raises(CommandNotFound):
        await api("device-explode", {})
    with pytest.raises(NotFound, match="nope"):
        await api("query-slots", {"vm": "nope"})


async def test_queue_through_the_api(api: Api) -> None:
    where = {"vm": "v", "bus": "pci.0", "slot": 7}
    queued = await api("function-add", {**where, "id": "q1", "driver": "virtio-rng-pci",
                                         "function": 1})
    assert queued and api.in_qemu() == set()
    pending = await api("query-pending", {"vm": "v"})
    assert [f["id"] for p in pending for f in p["functions"]] == ["q1"]
    await api("pending-cancel", where)
    assert await api("query-pending", {"vm": "v"}) == []
    with pytest.raises(NotFound):
        await api("pending-cancel", where)


async def test_introspection(api: Api) -> None:
    names = {c["name"] for c in await api("query-commands")}
    assert {"device-attach", "device-detach", "query-slots", "qmp_capabilities"} <= names
    vms = await api("query-vms")
    assert [v["name"] for v in vms] == ["v"]
    policy = await api("query-policy", {"vm": "v"})
    assert policy["serial-unplug"] is True and policy["buses"]
    schema = await api("query-qmp-schema")
    assert any(e.get("name") == "SLOT_EJECTED" for e in schema)
    assert (await api("query-version"))["qmpfd"]


async def test_every_reply_matches_its_model(api: Api) -> None:
    """Each command with a reply model answers exactly what the model describes (checked on
    every call above; this one covers the rest), and the schema says so."""
    await api("query-health")
    await api("query-events", {})
    await api("function-add", {"vm": "v", "bus": "pci.0", "slot": 8, "id": "z1",
                               "driver": "virtio-rng-pci", "function": 1})
    await api("function-add", {"vm": "v", "bus": "pci.0", "slot": 8, "id": "z0",
                               "driver": "virtio-rng-pci", "function": 0})
    await api("device-attach", {"vm": "v", "functions": FUNCS})
    await api("query-operations", {"vm": "v", "ended": True})
    await api("vm-remove", {"name": "v", "force": True})
    schema = {e["name"]: e for e in await api("query-qmp-schema")}
    assert schema["device-attach"]["ret-type"] == "Attached"
    assert schema["query-slots"]["ret-type"] == "[Slot]"
    members = {m["name"] for m in schema["Detached"]["members"]}
    assert {"ids", "seconds", "waited-for-guest", "host-released"} <= members


async def test_the_audit_line_and_the_counters_wait_for_the_reply(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping nobody waits for runs at the loop turn after the reply is in hand, not
    on its path: the audit line and the attach's counters come after it (in order)."""
    from qmpfd import metrics
    order: list[str] = []
    record = api.commands.audit.record
    monkeypatch.setattr(api.commands.audit, "record",
                        lambda *a: (order.append("audit"), record(*a))[1])
    count = metrics.operation
    monkeypatch.setattr(metrics, "operation",
                        lambda *a: (order.append(f"counted {a[2]}"), count(*a))[1])
    await api("device-attach", {"vm": "v", "functions": FUNCS})
    order.append("reply")
    await asyncio.sleep(0)
    assert order == ["reply", "counted ok", "audit"]


@pytest.mark.parametrize("functions", [FUNCS[:1], FUNCS])
async def test_the_attach_reply_is_made_while_qemu_works(
        api: Api, monkeypatch: pytest.MonkeyPatch, functions: list[dict[str, Any]]) -> None:
    """The success reply is built once, in the wait for QEMU's answer to the first
    device_adds (none of them answered yet), not after it; what is sent is the same as a reply
    built after the fact. A refused attach answers with its error, not with the prepared
    reply."""
    from qmpfd.api import replies
    from tests.unit.scripted_qemu import REFUSE
    made: list[set[str]] = []
    results: list[Any] = []
    real = replies.attached
    real_reply = replies.PreparedAttached.reply

    def counted(result: Any) -> Any:
        made.append(set(api.h.qemu.added))        # what QEMU had answered by then
        return real(result)

    def kept(self: replies.PreparedAttached, result: Any) -> Any:
        results.append(result)
        return real_reply(self, result)
    monkeypatch.setattr(replies, "attached", counted)
    monkeypatch.setattr(replies.PreparedAttached, "reply", kept)
    placed = await api("device-attach", {"vm": "v", "functions": functions})
    assert made == [set()]
    assert placed == real(results[0])
    api.h.qemu.script[("device_add", "x0")] = REFUSE
    with pytest.raises(QmpfdError):
        await api("device-attach", {"vm": "v", "functions": [{"id": "x0",
                                                             "driver": "virtio-rng-pci"}]})
