"""qmpfd's CPU per attach, two versions A/B in one run: a daemon from each checkout on the
same pc guest (two QMP monitors), rounds alternating, CPU of each daemon (schedstat, all
threads) over its own attaches. The machine's speed varies 2x between runs; a ratio within one
run does not.

    .venv/bin/python -m bench.ab_cpu --a /path/to/old/checkout --b . [--rounds 10] [--per-round 20]
        [--floor]

Reported per arm: CPU per attach (from the request to its reply) and per attach+detach cycle
(everything the daemon did in a round, its threads' deferred writes included, over the round's
cycles). ``--floor`` adds a third arm, bench/floor_relay.py (qemu.qmp behind a Unix socket and
nothing else): the least an asyncio relay costs per attach on this machine.
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


class FloorRelay(Daemon):
    """bench/floor_relay.py in place of qmpfd."""

    def _command(self, cfg: Path) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / "floor_relay.py"), str(self.sock)]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--functions", type=int, default=1)
    ap.add_argument("--floor", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpfd-ab-"))
    names = ["A", "B", "floor"] if args.floor else ["A", "B"]
    monitors = {n: work / "vm" / f"ab.qmp-{n}" for n in names[1:]}
    vm = LabVm("ab", work / "vm", LabVmSpec(machine="pc", extra=[
        a for m in monitors.values() for a in ("-qmp", f"unix:{m},server=on,wait=off")]))
    vm.start()
    monitors["A"] = vm.qmp_socket
    arms = {"A": Daemon(work / "a", source=args.a.resolve()),
            "B": Daemon(work / "b", source=args.b.resolve())}
    if args.floor:
        arms["floor"] = FloorRelay(work / "floor")
    attach: dict[str, list[float]] = {n: [] for n in names}
    cycle: dict[str, list[float]] = {n: [] for n in names}
    try:
        clients = {k: await client(d.sock) for k, d in arms.items()}
        for n in names:
            await clients[n].execute("vm-add", {"name": "ab", "qmp": str(monitors[n])})
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:   # rotate the order
                c, d = clients[name], arms[name]
                await asyncio.sleep(0.1)        # the other arm's deferred writes are done
                start = d.usage()[1]
                for i in range(args.per_round):
                    funcs = [{"id": f"{name}{r}x{i}f{f}", "driver": DRIVERS[f]}
                             for f in range(args.functions)]
                    before = d.usage()[1]
                    await c.execute("device-attach", {"vm": "ab", "functions": funcs})
                    attach[name].append(d.usage()[1] - before)
                    await c.execute("device-detach", {"vm": "ab",
                                                      "ids": [f["id"] for f in funcs]})
                await asyncio.sleep(0.1)        # this arm's deferred writes (10 ms) happen
                cycle[name].append((d.usage()[1] - start) / args.per_round)
    finally:
        for d in arms.values():
            d.stop()
        vm.stop()
    report(args.functions, attach, cycle)


def report(functions: int, attach: dict[str, list[float]],
           cycle: dict[str, list[float]]) -> None:
    for what, values in (("attach", attach), ("attach+detach cycle", cycle)):
        med = {k: statistics.median(v) * 1000 for k, v in values.items()}
        floor = f", floor relay {med['floor']:.3f}" if "floor" in med else ""
        print(f"{functions}-function {what}, CPU ms (median of {len(values['A'])}): "
              f"A {med['A']:.3f}, B {med['B']:.3f}, B/A {med['B'] / med['A']:.2f}{floor}")


if __name__ == "__main__":
    asyncio.run(main())
