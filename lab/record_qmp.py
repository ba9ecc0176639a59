"""Record what QEMU answers to qmpfd's adoption reads (identity, root buses, topology), for the
unit tests' replay link (tests/unit/replay.py): one JSON file per machine kind.

    .venv/bin/python -m lab.record_qmp pc tests/unit/fixtures/qmp-pc.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from lab.vm import LabVm, LabVmSpec
from qmpfd.errors import QemuError
from qmpfd.qemu.introspect import find_root_buses, read_identity, read_topology
from qmpfd.qemu.link import QmpLink


class Recording:
    def __init__(self, link: QmpLink) -> None:
        self.link = link
        self.name = link.name
        self.answers: dict[str, Any] = {}

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        key = json.dumps([cmd, args or {}], sort_keys=True)
        try:
            reply = await self.link.execute(cmd, args, timeout=timeout)
        except QemuError as exc:
            self.answers[key] = {"error": exc.desc}
            raise
        self.answers[key] = {"return": reply}
        return reply


async def record(machine: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vm = LabVm(f"rec-{machine}", Path(tmp), LabVmSpec(machine=machine, root_ports=2))
        vm.start(boot_timeout=180)
        try:
            link = QmpLink("rec", vm.qmp_socket, 10)
            await link.connect(10)
            rec = Recording(link)
            await read_identity(rec)  # type: ignore[arg-type]
            roots = await find_root_buses(rec)  # type: ignore[arg-type]
            await read_topology(rec, roots)  # type: ignore[arg-type]
            await link.close()
        finally:
            vm.stop()
    out.write_text(json.dumps(rec.answers, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1], Path(sys.argv[2])))
