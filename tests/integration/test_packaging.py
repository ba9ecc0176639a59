"""The wheel as a user gets it: the daemon and the CLI only, typed, licensed, with
bounded dependencies and both commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_holds_the_daemon_and_cli_typed_and_licensed(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                          "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("qmpfd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"qmpfd", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "qmpfd/py.typed" in names
    assert "qmpfd/cli/__init__.py" in names and "qmpfd/daemon.py" in names
    dist = next(t for t in tops if t.endswith(".dist-info"))
    assert any(n.startswith(f"{dist}/") and "LICENSE" in n for n in names), names
    meta = zipfile.ZipFile(wheel).read(f"{dist}/METADATA").decode()
    assert "Classifier: Typing :: Typed" in meta
    assert "Requires-Dist: qemu.qmp<0.1,>=0.0.3" in meta or \
        "Requires-Dist: qemu.qmp>=0.0.3,<0.1" in meta, meta
    assert "Project-URL" in meta
    entry = zipfile.ZipFile(wheel).read(f"{dist}/entry_points.txt").decode()
    assert "qmpfd = qmpfd.daemon:main" in entry and "qmpfctl = qmpfd.cli:main" in entry
