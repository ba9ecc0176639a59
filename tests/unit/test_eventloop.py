"""[daemon] event-loop: which loop each choice runs, and a clear refusal when the one asked
for is missing."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from types import ModuleType

import pytest

from qmpfd.config import load_config
from qmpfd.errors import InvalidRequest
from qmpfd.eventloop import loop_factory, running_loop_name


def name_inside(choice: str) -> str:
    """The loop a daemon configured with ``choice`` would run, named from inside it."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:  # type: ignore[arg-type]
        return runner.run(_name())


async def _name() -> str:
    return running_loop_name()


def test_asyncio_keeps_the_standard_loop() -> None:
    assert name_inside("asyncio") == "asyncio"


def test_auto_and_uvloop_run_uvloop_when_it_is_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop is a dependency on x86_64 and aarch64")
    assert name_inside("auto") == "uvloop"
    assert name_inside("uvloop") == "uvloop"


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def missing(name: str) -> ModuleType:
        if name == "uvloop":
            raise ImportError(name)
        return real(name)
    monkeypatch.setattr(importlib, "import_module", missing)
    assert name_inside("auto") == "asyncio"
    with pytest.raises(InvalidRequest, match=r"daemon\.event-loop: 'uvloop' is not installed"):
        loop_factory("uvloop")


def test_the_config_names_a_wrong_choice(tmp_path: Path) -> None:
    path = tmp_path / "qmpfd.toml"
    path.write_text('[daemon]\nevent-loop = "tokio"\n')
    with pytest.raises(InvalidRequest, match="event-loop"):
        load_config(path)
    path.write_text('[daemon]\nevent-loop = "asyncio"\n')
    assert load_config(path).daemon.event_loop == "asyncio"
