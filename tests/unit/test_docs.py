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


@pytest.mark.parametrize("table, name", [("COMMANDS", "device-detach"),
                                         ("EVENTS", "SLOT_EJECTED")])
def test_a_command_or_event_without_documentation_fails_the_build(
        table: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = dict(getattr(commanddocs, table))
    del docs[name]
    monkeypatch.setattr(commanddocs, table, docs)
    with pytest.raises(SystemExit, match=name):
        gen_docs().api_page()


def test_every_argument_member_is_explained() -> None:
    page = gen_docs().api_page()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and not [r for r in rows if r.rstrip().endswith("|  |")], rows
