"""Where qmpfd's CPU goes in a 1-function attach: a pc guest, N attach/detach cycles through
qmpfd, the daemon's CPU per attach (schedstat, all threads) measured without a profiler, then
the same cycles with the daemon under cProfile, its top functions printed.

    .venv/bin/python -m bench.profile_attach [--cycles 200] [--functions 1] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import pstats
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench import DRIVERS, Daemon, client  # noqa: E402
from lab.vm import LabVm, LabVmSpec  # noqa: E402


async def cycles(sock: Path, vm: LabVm, n: int, count: int, daemon: Daemon) -> float:
    """CPU seconds of the daemon per attach, over ``count`` attach/detach cycles."""
    c = await client(sock)
    await c.execute("vm-add", {"name": "p", "qmp": str(vm.qmp_socket)})
    cpu = 0.0
    for r in range(count):
        funcs = [{"id": f"p{r}f{i}", "driver": DRIVERS[i]} for i in range(n)]
        before = daemon.usage()[1]
        await c.execute("device-attach", {"vm": "p", "functions": funcs})
        cpu += daemon.usage()[1] - before
        await c.execute("device-detach", {"vm": "p", "ids": [f["id"] for f in funcs]})
    await c.execute("vm-remove", {"name": "p"})
    await c.disconnect()
    return cpu / count


def user_system(pid: int) -> tuple[int, int]:
    """utime and stime of a process, in clock ticks (10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


class ProfiledDaemon(Daemon):
    def __init__(self, work: Path, out: Path, state_dir: Path | None) -> None:
        self.out = out
        super().__init__(work, state_dir)

    def _command(self, cfg: Path) -> list[str]:
        # The event loop thread's CPU time (thread_time), not wall time: a wait in the kernel
        # (a socket wakeup, the scheduler) is not qmpfd's work.
        script = ("import cProfile, sys, time\n"
                  "from qmpfd.daemon import main\n"
                  "p = cProfile.Profile(time.thread_time)\n"
                  "try:\n    p.runcall(main, sys.argv[1:])\n"
                  f"finally:\n    p.dump_stats({str(self.out)!r})\n")
        return [sys.executable, "-c", script, "--config", str(cfg)]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--functions", type=int, default=1)
    ap.add_argument("--state-dir", type=Path)
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmpfd-prof-"))
    vm = LabVm("prof", work / "vm", LabVmSpec(machine="pc"))
    vm.start()
    try:
        plain = Daemon(work / "plain", args.state_dir)
        ticks0 = user_system(plain.proc.pid)
        per_attach = await cycles(plain.sock, vm, args.functions, args.cycles, plain)
        ticks = [b - a for a, b in zip(ticks0, user_system(plain.proc.pid), strict=True)]
        plain.stop()
        out = work / "prof.out"
        prof = ProfiledDaemon(work / "prof", out, args.state_dir)
        await cycles(prof.sock, vm, args.functions, args.cycles, prof)
        prof.proc.terminate()
        prof.proc.wait(60)
    finally:
        vm.stop()
    print(f"qmpfd CPU per {args.functions}-function attach (no profiler): "
          f"{per_attach * 1000:.3f} ms over {args.cycles} cycles; per attach+detach cycle, "
          f"user {ticks[0] * 10 / args.cycles:.2f} ms, system {ticks[1] * 10 / args.cycles:.2f} ms")
    buf = io.StringIO()
    stats = pstats.Stats(str(out), stream=buf)
    stats.sort_stats("tottime").print_stats(args.top)
    print(buf.getvalue())


if __name__ == "__main__":
    asyncio.run(main())
