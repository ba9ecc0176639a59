"""The generated references: a command or an event without prose stops the docs build, and
every argument member of every command is explained."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from qmpfd.api import commanddocs

ROOT = Path(__file__).resolve().parents[2]


def gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_command_without_documentation_fails_the_build(
        monkeypatch: pytest.MonkeyPatch) -> None:
    docs = dict(commanddocs.COMMANDS)
    del docs["device-detach"]
    monkeypatch.setattr(commanddocs, "COMMANDS", docs)
    with pytest.raises(SystemExit, match="device-detach"):
        gen_docs().api_page()


def test_an_event_without_documentation_fails_the_build(
        monkeypatch: pytest.MonkeyPatch) -> None:
    events = dict(commanddocs.EVENTS)
    del events["SLOT_EJECTED"]
    monkeypatch.setattr(commanddocs, "EVENTS", events)
    with pytest.raises(SystemExit, match="SLOT_EJECTED"):
        gen_docs().api_page()


def test_every_argument_member_is_explained() -> None:
    page = gen_docs().api_page()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and not [r for r in rows if r.rstrip().endswith("|  |")], rows
