"""The README's first command: the demo (qmpfd + a small guest, a real 4-function hotplug and
unplug) must work from a clean clone, so CI runs it as an operator would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_to_the_end() -> None:
    out = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True,
                         cwd=Path(__file__).parents[2], text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The guest's own report: four functions of one slot (the demo checks it too).
    shown = out.stdout.split("now shows", 1)[1].splitlines()[1].split()
    assert len(shown) == 4 and len({bdf.rsplit(".", 1)[0] for bdf in shown}) == 1, shown
    assert "demo finished: multifunction hotplug and unplug proven in the guest" in out.stdout
