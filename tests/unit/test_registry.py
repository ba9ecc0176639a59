"""The VM registry over replayed QEMUs (tests/unit/replay.py): adopt, refuse twins, look up by
name or UUID, remove, and take every VM back after a restart from the journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpfd.config import load_config
from qmpfd.errors import Conflict, NotFound
from qmpfd.state.journal import Journal
from qmpfd.vm import managed as managed_mod
from qmpfd.vm.registry import VmRegistry
from tests.unit.replay import ReplayLink


@pytest.fixture
def replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    def replay(name: str, path: Path, _timeout: float) -> ReplayLink:
        return ReplayLink("q35-native" if "q35" in path.name else "pc", name)
    monkeypatch.setattr(managed_mod, "QmpLink", replay)


def registry(tmp_path: Path) -> VmRegistry:
    cfg = tmp_path / "qmpfd.toml"
    cfg.write_text(f'[daemon]\nsocket = "{tmp_path}/s"\nstate-dir = "{tmp_path}/state"\n'
                   f'[access]\nusers = ["root"]\nqmp-dirs = ["{tmp_path}"]\n')
    return VmRegistry(load_config(cfg), lambda n, d: None, Journal.open(tmp_path))


async def test_adopt_look_up_remove(tmp_path: Path, replayed: None) -> None:
    reg = registry(tmp_path)
    info = await reg.add("a", tmp_path / "pc.qmp")
    assert info.policy == "acpi-pcihp" and reg.get("a").name == "a"
    await reg.add("b", tmp_path / "q35.qmp")
    with pytest.raises(Conflict, match="name: a VM named 'a'"):
        await reg.add("a", tmp_path / "other.qmp")
    with pytest.raises(Conflict, match="already managed as VM 'a'"):
        await reg.add("c", tmp_path / "pc.qmp")
    if info.uuid:
        assert reg.get(info.uuid).name == "a"
    with pytest.raises(NotFound):
        reg.get("nope")
    assert set(reg.journal.vms) == {"a", "b"}
    await reg.remove("a")
    assert [v.name for v in reg.all()] == ["b"] and set(reg.journal.vms) == {"b"}
    await reg.close()
    assert reg.all() == []


async def test_readopt_after_a_restart(tmp_path: Path, replayed: None) -> None:
    first = registry(tmp_path)
    await first.add("a", tmp_path / "pc.qmp")
    await first.close()
    first.journal.close()
    again = registry(tmp_path)            # a new daemon on the same state directory
    await again.readopt()
    vm = again.get("a")
    assert vm.link.connected and vm.policy_name() == "acpi-pcihp"
    await again.close()
