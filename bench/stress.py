"""The long concurrency run (lab/stress.py) and what the ACPI reuse delay changes.

    .venv/bin/python -m bench.stress [--seconds 600] [--clients 3] [--machines pc]
                                     [--rounds 2] [--variants default,unguarded]

One lab VM per machine kind, booted once. For each round and each variant (interleaved: A, B,
A, B, ... so the machine's drift hits all alike), a fresh qmpfd on a fresh state dir with the
variant's ACPI settings, and the clients of lab/stress.py for ``seconds / rounds`` seconds.
Variants: ``default`` (qmpfd as shipped: the unplug gate, no reuse delay), ``gate+delay`` (the
gate and a 2 s reuse delay), ``delay-only`` (a 2 s reuse delay, no gate), ``unguarded``
(neither: what several raw QMP clients get). Counts per variant go to bench/stress-latest.md
(bench/stress-results.md keeps the runs the README cites): requests by outcome, SLOT_EJECTED
events (the guest ejecting a slot unasked) and violations (a reply QEMU contradicts, or qmpfd,
QEMU and the guest disagreeing at the end). Counts, not times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import Daemon, client  # noqa: E402
from lab import stress  # noqa: E402
from lab.vm import LabVm, LabVmSpec  # noqa: E402

VARIANTS = {
    "default": "",
    "gate+delay": "reuse-delay = 2\n",
    "delay-only": "serial-unplug = false\nreuse-delay = 2\n",
    "unguarded": "serial-unplug = false\n",
}


async def one_round(work: Path, labs: dict[str, LabVm], variant: str, clients: int,
                    seconds: float, seed: int) -> stress.StressResult:
    extra = f"[timeouts.policy.acpi-pcihp]\n{VARIANTS[variant]}"
    d = Daemon(work / f"qmpfd-{seed}-{variant}", extra=extra)
    try:
        c = await client(d.sock)
        vms = []
        for machine, lab in labs.items():
            await c.execute("vm-add", {"name": machine, "qmp": str(lab.qmp_socket)})
            vms.append(stress.StressVm(machine, lab, frozenset(lab.guest_pci() or ()),
                                       frozenset(await peripheral(lab))))
        await c.disconnect()
        return await stress.run(d.sock, vms, clients=clients, seconds=seconds, seed=seed)
    finally:
        d.stop()


async def peripheral(lab: LabVm) -> set[str]:
    """What QEMU holds before the run (built-in devices with ids), on its second monitor."""
    one = stress.Referee([stress.StressVm("x", lab, frozenset(), frozenset())])
    await one.open()
    try:
        return await one.peripheral("x")
    finally:
        await one.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--machines", default="pc")
    ap.add_argument("--variants", default="default,unguarded")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    delays = args.variants.split(",")
    machines = args.machines.split(",")
    per_round = args.seconds / args.rounds
    totals: dict[str, Counter[str]] = {d: Counter() for d in delays}
    examples: dict[str, list[str]] = {d: [] for d in delays}
    with tempfile.TemporaryDirectory(prefix="qmpfd-stress-") as tmp:
        work = Path(tmp)
        labs = {m: LabVm(f"stress-{m}", work / m, LabVmSpec(machine=m, root_ports=4))
                for m in machines}
        try:
            for lab in labs.values():
                lab.start(boot_timeout=300)
            for r in range(args.rounds):
                for delay in delays:
                    res = asyncio.run(one_round(work, labs, delay, args.clients, per_round,
                                                seed=r + 1))
                    print(f"round {r + 1} {delay}: {res.summary()}", flush=True)
                    totals[delay].update(res.counts)
                    totals[delay]["SLOT_EJECTED events"] += len(res.ejected)
                    totals[delay]["violations"] += len(res.violations)
                    examples[delay] += res.violations[:3]
        finally:
            for lab in labs.values():
                lab.stop()
    write(args, delays, totals, examples)


def write(args: argparse.Namespace, delays: list[str], totals: dict[str, Counter[str]],
          examples: dict[str, list[str]]) -> None:
    keys = sorted({k for c in totals.values() for k in c})
    lines = [
        "# Concurrency run (bench/stress.py)", "",
        f"{time.strftime('%Y-%m-%d')}: {args.clients} clients, {args.seconds:g} s per variant "
        f"in {args.rounds} interleaved rounds, machines {args.machines}; real guests "
        "under TCG, QEMU's second monitor and the guest as referees (lab/stress.py).", "",
        "| count | " + " | ".join(delays) + " |",
        "|---|" + "---|" * len(delays)]
    lines += [f"| {k} | " + " | ".join(str(totals[d][k]) for d in delays) + " |" for k in keys]
    for d in delays:
        if examples[d]:
            lines += ["", f"Violations seen with {d} (first ones):", ""]
            lines += [f"- {v}" for v in examples[d]]
    out = ROOT / "bench" / "stress-latest.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
