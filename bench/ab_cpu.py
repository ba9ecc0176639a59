"""qmpfd's CPU per attach, two versions A/B in one run: a daemon from each checkout on the
same pc guest (two QMP monitors), rounds alternating, CPU of each daemon (schedstat, all
threads) over its own attaches. The machine's speed varies 2x between runs; a ratio within one
run does not.

    .venv/bin/python -m bench.ab_cpu --a /path/to/old/checkout --b . [--rounds 10] [--per-round 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import DRIVERS, Daemon, client  # noqa: E402
from lab.vm import LabVm, LabVmSpec  # noqa: E402


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--functions", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpfd-ab-"))
    second = work / "vm" / "ab.qmp-b"
    vm = LabVm("ab", work / "vm", LabVmSpec(machine="pc", extra=[
        "-qmp", f"unix:{second},server=on,wait=off"]))
    vm.start()
    arms = {"A": Daemon(work / "a", source=args.a.resolve()),
            "B": Daemon(work / "b", source=args.b.resolve())}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    try:
        clients = {k: await client(d.sock) for k, d in arms.items()}
        await clients["A"].execute("vm-add", {"name": "ab", "qmp": str(vm.qmp_socket)})
        await clients["B"].execute("vm-add", {"name": "ab", "qmp": str(second)})
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                c, d = clients[name], arms[name]
                for i in range(args.per_round):
                    funcs = [{"id": f"{name}{r}x{i}f{f}", "driver": DRIVERS[f]}
                             for f in range(args.functions)]
                    before = d.usage()[1]
                    await c.execute("device-attach", {"vm": "ab", "functions": funcs})
                    cpu[name].append(d.usage()[1] - before)
                    await c.execute("device-detach", {"vm": "ab",
                                                      "ids": [f["id"] for f in funcs]})
    finally:
        for d in arms.values():
            d.stop()
        vm.stop()
    a, b = (statistics.median(cpu[k]) * 1000 for k in ("A", "B"))
    print(f"{args.functions}-function attach, qmpfd CPU ms per attach (median of "
          f"{len(cpu['A'])}): A {a:.3f}, B {b:.3f}, B/A {b / a:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
