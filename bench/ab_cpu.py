"""qmpfd's CPU per attach, two versions A/B in one run: a daemon from each checkout on the
same pc guest (two QMP monitors), rounds alternating, CPU of each daemon (schedstat, all
threads) over its own attaches. The machine's speed varies 2x between runs; a ratio within one
run does not.

    .venv/bin/python -m bench.ab_cpu --a /path/to/old/checkout --b . [--rounds 10] [--per-round 20]
        [--floor] [--bare] [--raw]

Reported per arm: CPU per attach (from the request to its reply) and per attach+detach cycle
(everything the daemon did in a round, its threads' deferred writes included, over the round's
cycles). ``--floor`` adds a third arm, bench/floor_relay.py (qemu.qmp behind a Unix socket and
nothing else): the least an asyncio relay through qemu.qmp costs per attach on this machine;
``--bare`` one more, bench/bare_relay.py (no QMP library, a protocol per socket, no task): the
least any Python relay costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qemu.qmp import EventListener, QMPClient  # noqa: E402

from bench.bench import DRIVERS, Daemon, client, raw_plug, raw_unplug  # noqa: E402
from lab.vm import LabVm, LabVmSpec  # noqa: E402

#: seconds per attach call, per arm, of the last :func:`compare`
LATENCY: dict[str, list[float]] = {}


class RawQmp:
    """Not a daemon: the bench itself sends device_add / device_del on a QEMU monitor of its
    own (the latency reference; its CPU is the bench's, not measured)."""

    def __init__(self, work: Path) -> None:
        self.events = EventListener()
        self.qmp = QMPClient("raw")
        self.qmp.register_listener(self.events)

    def usage(self) -> tuple[int, float]:
        return 0, 0.0

    def stop(self) -> None:
        pass

    async def cycle(self, ids: list[str]) -> float:
        """Attach ``ids`` (one driver each) at pci.0 slot 0x11 and detach them: the attach's
        seconds."""
        t0 = time.perf_counter()
        await raw_plug(self.qmp, len(ids), ids, "pci.0", 0x11)
        took = time.perf_counter() - t0
        await raw_unplug(self.qmp, self.events, ids)
        return took


class FloorRelay(Daemon):
    """bench/floor_relay.py in place of qmpfd."""

    script = "floor_relay.py"

    def _command(self, cfg: Path) -> list[str]:
        return [sys.executable, str(ROOT / "bench" / self.script), str(self.sock)]


class BareRelay(FloorRelay):
    """bench/bare_relay.py in place of qmpfd."""

    script = "bare_relay.py"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--functions", type=int, default=1)
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--raw", action="store_true", help="an arm sending QMP by hand (latency)")
    args = ap.parse_args()
    arms: dict[str, Callable[[Path], Daemon | RawQmp]] = {
        "A": lambda w: Daemon(w, source=args.a.resolve()),
        "B": lambda w: Daemon(w, source=args.b.resolve())}
    if args.floor:
        arms["floor"] = FloorRelay
    if args.bare:
        arms["bare"] = BareRelay
    if args.raw:
        arms["raw"] = RawQmp
    attach, cycle = await compare(Path(tempfile.mkdtemp(prefix="qmpfd-ab-")), arms,
                                  args.rounds, args.per_round, args.functions)
    report(args.functions, attach, cycle)


async def compare(work: Path, make: dict[str, Callable[[Path], Daemon | RawQmp]], rounds: int,
                  per_round: int, functions: int = 1
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Daemons on one pc guest (a QMP monitor each), rounds of attach/detach cycles in a
    rotating order: CPU seconds per attach (each) and per cycle (each round's mean), per arm;
    each attach's wall time in ``LATENCY`` (per arm)."""
    names = list(make)
    LATENCY.clear()
    monitors = {n: work / "vm" / f"ab.qmp-{n}" for n in names[1:]}
    vm = LabVm("ab", work / "vm", LabVmSpec(machine="pc", extra=[
        a for m in monitors.values() for a in ("-qmp", f"unix:{m},server=on,wait=off")]))
    vm.start()
    monitors[names[0]] = vm.qmp_socket
    arms = {n: make[n](work / n) for n in names}
    attach: dict[str, list[float]] = {n: [] for n in names}
    cycle: dict[str, list[float]] = {n: [] for n in names}
    try:
        clients: dict[str, QMPClient] = {}
        for n, d in arms.items():
            if isinstance(d, RawQmp):
                await d.qmp.connect(str(monitors[n]))
                clients[n] = d.qmp
                continue
            clients[n] = await client(d.sock)
            await clients[n].execute("vm-add", {"name": "ab", "qmp": str(monitors[n])})
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:   # rotate the order
                c, d = clients[name], arms[name]
                await asyncio.sleep(0.1)        # the other arm's deferred writes are done
                start = d.usage()[1]
                for i in range(per_round):
                    funcs = [{"id": f"{name}{r}x{i}f{f}", "driver": DRIVERS[f]}
                             for f in range(functions)]
                    if isinstance(d, RawQmp):
                        LATENCY.setdefault(name, []).append(
                            await d.cycle([f["id"] for f in funcs]))
                        continue
                    before = d.usage()[1]
                    t0 = time.perf_counter()
                    await c.execute("device-attach", {"vm": "ab", "functions": funcs})
                    LATENCY.setdefault(name, []).append(time.perf_counter() - t0)
                    attach[name].append(d.usage()[1] - before)
                    await c.execute("device-detach", {"vm": "ab",
                                                      "ids": [f["id"] for f in funcs]})
                await asyncio.sleep(0.1)        # this arm's deferred writes (10 ms) happen
                if not isinstance(d, RawQmp):
                    cycle[name].append((d.usage()[1] - start) / per_round)
        for c in clients.values():
            await c.disconnect()
    finally:
        for d in arms.values():
            d.stop()
        vm.stop()
    return attach, cycle


def report(functions: int, attach: dict[str, list[float]],
           cycle: dict[str, list[float]]) -> None:
    for what, values in (("attach", attach), ("attach+detach cycle", cycle)):
        med = {k: statistics.median(v) * 1000 for k, v in values.items() if v}
        floor = "".join(f", {k} relay {med[k]:.3f}" for k in ("floor", "bare") if k in med)
        print(f"{functions}-function {what}, CPU ms (median of {len(values['A'])}): "
              f"A {med['A']:.3f}, B {med['B']:.3f}, B/A {med['B'] / med['A']:.2f}{floor}")
    lat = {k: statistics.median(v) * 1000 for k, v in LATENCY.items()}
    print(f"{functions}-function attach returns, ms (median): "
          + ", ".join(f"{k} {v:.2f}" for k, v in lat.items()) + f", B/A {lat['B'] / lat['A']:.2f}"
          + (", vs raw: " + ", ".join(f"{k} {v / lat['raw']:.2f}x" for k, v in lat.items())
             if "raw" in lat else ""))


if __name__ == "__main__":
    asyncio.run(main())
