"""qmpfd benchmarks: one command, one machine, everything side by side.

    bench/run            # writes bench/results.md and bench/chart.png

1. Overhead: N-function attach+detach (N = 1, 2, 4, 8) through qmpfd vs the same device_add /
   device_del sequence sent by hand with qemu.qmp on the SAME VM's second QMP monitor, runs
   interleaved A/B, medians; time to "QMP done" and to "the guest sees every function" (the
   guest's own report); qmpfd's CPU per attach; and every QMP command qmpfd sends per attach and
   per detach, counted by a logging proxy between qmpfd and QEMU (lab/qmp_proxy.py).
2. libvirt 9.0 (bench/libvirt_bench.py, with libvirt-python and the lab's libvirt guest):
   attachDeviceFlags of one function vs qmpfd with one and eight; the multifunction case refused.
3. Unplug: time to the last DEVICE_DELETED, acpi-pcihp vs pcie-native (q35).
4. Scale: one qmpfd holding 50 and 100 QEMUs (held at start, no guest), concurrent 4-function
   attaches on all, alternating rounds through qmpfd and raw QMP (each QEMU's second monitor) in
   the same run: attach rates and their ratio, p50/p99, qmpfd's RSS and CPU per VM.
5. The pure planner: planning time against topology size (buses x slots).
Benchmarks, not tests: nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.qmp_proxy import QmpProxy  # noqa: E402
from lab.vm import LabVm, LabVmSpec  # noqa: E402
from qmpfd.hotplug.plan import FunctionSpec, plan_attach  # noqa: E402
from qmpfd.hotplug.policies import policy_for  # noqa: E402
from qmpfd.hotplug.slots import SlotTable  # noqa: E402
from qmpfd.qemu.topology import RawBus, RawDevice, Topology  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "16"))
DRIVERS = ["e1000", "virtio-rng-pci", "virtio-net-pci", "virtio-rng-pci"] * 2


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": pct(values, 95), "n": len(values)}


class Daemon:
    def __init__(self, work: Path, state_dir: Path | None = None, extra: str = "",
                 source: Path | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.sock = work / "qmpfd.sock"
        cfg = work / "qmpfd.toml"
        state = state_dir or work / "state"
        cfg.write_text(f'[daemon]\nsocket = "{self.sock}"\nstate-dir = "{state}"\n'
                       f'log-level = "warning"\n[access]\nqmp-dirs = ["{work.parent}"]\n'
                       f'{extra}')
        # ``source``: another checkout of qmpfd to run (an A/B of two versions)
        env = {**os.environ, "PYTHONPATH": str(source)} if source else None
        self.proc = subprocess.Popen(self._command(cfg), stderr=(work / "qmpfd.log").open("wb"),
                                     cwd=source, env=env)
        while not self.sock.exists():
            time.sleep(0.05)

    def _command(self, cfg: Path) -> list[str]:
        return [sys.executable, "-m", "qmpfd.daemon", "--config", str(cfg)]

    def usage(self) -> tuple[int, float]:
        """(RSS bytes, CPU seconds) of the daemon."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss_kb = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS"))
        rss = int(rss_kb) * 1024
        # schedstat: nanoseconds on a CPU, all threads (stat's clock ticks are 10 ms coarse)
        cpu_ns = sum(int((t / "schedstat").read_text().split()[0])
                     for t in Path(f"/proc/{self.proc.pid}/task").iterdir())
        return rss, cpu_ns / 1e9

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def client(path: Path) -> QMPClient:
    c = QMPClient("bench")
    await c.connect(str(path))
    return c


async def guest_sees(vm: LabVm, cond: Callable[[set[str]], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = vm.guest_pci()
        if seen is not None and cond(seen):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("guest did not report")


# -- 1. overhead --------------------------------------------------------------------------
async def qmpfd_cycle(c: QMPClient, vm: LabVm, name: str, n: int, tag: str,
                      daemon: Daemon | None = None) -> dict[str, float]:
    before = vm.guest_pci() or set()
    funcs = [{"id": f"{tag}f{i}", "driver": DRIVERS[i]} for i in range(n)]
    cpu0 = daemon.usage()[1] if daemon else 0.0
    t0 = time.perf_counter()
    await c.execute("device-attach", {"vm": name, "functions": funcs})
    qmp_done = time.perf_counter() - t0
    cpu = (daemon.usage()[1] - cpu0) if daemon else 0.0
    await guest_sees(vm, lambda s: len(s - before) >= n)
    seen = time.perf_counter() - t0
    t1 = time.perf_counter()
    await c.execute("device-detach", {"vm": name, "ids": [f["id"] for f in funcs]})
    detached = time.perf_counter() - t1
    await guest_sees(vm, lambda s: s == before)
    return {"attach_qmp": qmp_done, "attach_guest": seen, "detach": detached, "cpu": cpu}


async def raw_plug(c: QMPClient, n: int, ids: list[str], bus: str, slot: int,
                   drivers: list[str] = DRIVERS) -> None:
    """The sequence qmpfd sends, by hand: the non-zero functions' device_adds together, every
    reply awaited, then function 0 (multifunction=on when N > 1)."""
    def args(fn: int) -> dict[str, Any]:
        a: dict[str, Any] = {"driver": drivers[fn], "id": ids[fn], "bus": bus,
                             "addr": f"{slot:#x}.{fn:x}" if n > 1 else f"{slot:#x}"}
        if n > 1 and fn == 0:
            a["multifunction"] = True
        return a
    await asyncio.gather(*(c.execute("device_add", args(fn)) for fn in range(1, n)))
    await c.execute("device_add", args(0))


async def raw_unplug(c: QMPClient, events: EventListener, ids: list[str]) -> None:
    """One device_del of function 0, by hand, and every function's DEVICE_DELETED."""
    events.clear()
    await c.execute("device_del", {"id": ids[0]})
    pending = set(ids)
    while pending:
        ev = await asyncio.wait_for(events.get(), 30)
        if ev["event"] == "DEVICE_DELETED" and ev["data"].get("device"):
            pending.discard(ev["data"]["device"])


async def raw_cycle(c: QMPClient, events: EventListener, vm: LabVm, n: int,
                    tag: str, bus: str, slot: int) -> dict[str, float]:
    """Raw QMP on the VM's second monitor: plug as qmpfd does, one device_del, wait for every
    DEVICE_DELETED."""
    before = vm.guest_pci() or set()
    ids = [f"{tag}f{i}" for i in range(n)]
    t0 = time.perf_counter()
    await raw_plug(c, n, ids, bus, slot)
    qmp_done = time.perf_counter() - t0
    await guest_sees(vm, lambda s: len(s - before) >= n)
    seen = time.perf_counter() - t0
    t1 = time.perf_counter()
    await raw_unplug(c, events, ids)
    detached = time.perf_counter() - t1
    await guest_sees(vm, lambda s: s == before)
    return {"attach_qmp": qmp_done, "attach_guest": seen, "detach": detached}


async def overhead(work: Path, daemon: Daemon) -> dict[str, Any]:
    """One pc VM, three QMP monitors: qmpfd holds the first, raw QMP speaks on the second, and a
    second qmpfd whose state dir is on tmpfs (/dev/shm: the journal's fdatasync costs nothing)
    holds the third, to show how much of qmpfd's time is the disk flush. Runs rotate between
    the three on the same guest and the same slot, so the only difference is qmpfd."""
    third = work / "ovh.qmp-third"
    vm = LabVm("ovh", work, LabVmSpec(machine="pc", extra=[
        "-qmp", f"unix:{third},server=on,wait=off"]))
    vm.start()
    shm = Path(tempfile.mkdtemp(prefix="qmpfd-bench-", dir="/dev/shm"))
    mem = Daemon(work / "tmpfs-daemon", state_dir=shm / "state")
    try:
        c = await client(daemon.sock)
        await c.execute("vm-add", {"name": "ovh", "qmp": str(vm.qmp_socket)})
        c_mem = await client(mem.sock)
        await c_mem.execute("vm-add", {"name": "ovh", "qmp": str(third)})
        raw = await client(vm.inspect_socket)
        events = EventListener()
        raw.register_listener(events)
        out: dict[str, Any] = {}
        for n in (1, 2, 4, 8):
            res: dict[str, list[dict[str, float]]] = {"qmpfd": [], "raw": [], "tmpfs": []}
            plan: dict[str, Any] = await c.execute("device-attach", {  # type: ignore[assignment]
                "vm": "ovh", "dry-run": True, "functions": [{"id": "probe", "driver": "e1000"}]})
            arms: list[tuple[str, Callable[[int], Awaitable[dict[str, float]]]]] = [
                ("qmpfd", lambda r, n=n: qmpfd_cycle(c, vm, "ovh", n, f"q{n}r{r}", daemon)),
                ("raw", lambda r, n=n, p=plan: raw_cycle(raw, events, vm, n, f"r{n}r{r}",
                                                         p["bus"], int(p["slot"]))),
                ("tmpfs", lambda r, n=n: qmpfd_cycle(c_mem, vm, "ovh", n, f"m{n}r{r}", mem)),
            ]
            for r in range(RUNS):  # interleaved; who goes first rotates
                for name, cycle in arms[r % 3:] + arms[:r % 3]:
                    res[name].append(await cycle(r))
            out[str(n)] = {k: {m: summary([x[m] for x in v]) for m in v[0]}
                           for k, v in res.items()}
            out[str(n)]["qmpfd_cpu_ms_per_attach"] = (
                sum(x["cpu"] for x in res["qmpfd"]) / RUNS * 1000)
        await c.execute("vm-remove", {"name": "ovh"})
        out["commands"] = await commands_sent(c, vm, work)
        for cl in (c, c_mem, raw):
            await cl.disconnect()
        return out
    finally:
        mem.stop()
        shutil.rmtree(shm, ignore_errors=True)
        vm.stop()


async def commands_sent(c: QMPClient, vm: LabVm, work: Path) -> dict[str, Any]:
    """Every QMP command qmpfd sends per attach and per detach, counted by a logging proxy
    between qmpfd and QEMU (lab/qmp_proxy.py), not by qmpfd."""
    proxy = QmpProxy(work / "proxy.qmp", vm.qmp_socket)
    await proxy.start()
    out: dict[str, Any] = {}
    try:
        await c.execute("vm-add", {"name": "cnt", "qmp": str(proxy.listen)})
        out["adopt"] = proxy.reset()
        for n in (1, 2, 4, 8):
            before = vm.guest_pci() or set()
            funcs = [{"id": f"c{n}f{i}", "driver": DRIVERS[i]} for i in range(n)]
            proxy.reset()
            await c.execute("device-attach", {"vm": "cnt", "functions": funcs})
            attach = proxy.reset()
            await guest_sees(vm, lambda s, b=before, n=n: len(s - b) >= n)
            await c.execute("device-detach", {"vm": "cnt", "ids": [f["id"] for f in funcs]})
            detach = proxy.reset()
            await guest_sees(vm, lambda s, b=before: s == b)
            out[str(n)] = {"attach": attach, "detach": detach}
        await c.execute("vm-remove", {"name": "cnt"})
    finally:
        await proxy.close()
    return out


# -- 2. libvirt is below; 3. unplug ---------------------------------------------------------
async def unplug(work: Path, daemon: Daemon) -> dict[str, Any]:
    out = {}
    c = await client(daemon.sock)
    for machine in ("q35", "q35-native"):
        vm = LabVm(f"unp-{machine}", work / machine, LabVmSpec(machine=machine, root_ports=2))
        vm.start()
        try:
            await c.execute("vm-add", {"name": vm.name, "qmp": str(vm.qmp_socket)})
            times = []
            for r in range(max(3, RUNS // 2)):
                cyc = await qmpfd_cycle(c, vm, vm.name, 4, f"u{r}")
                times.append(cyc["detach"])
            policy = (await c.execute("query-policy", {"vm": vm.name}))["policy"]
            out[policy] = summary(times)
            await c.execute("vm-remove", {"name": vm.name})
        finally:
            vm.stop()
    await c.disconnect()
    return out


# -- 4. scale -------------------------------------------------------------------------------
SCALE_ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "6"))


def start_bare_qemu(work: Path, i: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A QEMU held at start (no guest) with two QMP monitors: qmpfd's and raw QMP's."""
    sock, raw = work / f"s{i}.qmp", work / f"s{i}.raw"
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "32",
                             "-nodefaults", "-display", "none", "-S",
                             "-qmp", f"unix:{sock},server=on,wait=off",
                             "-qmp", f"unix:{raw},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, sock, raw


async def timed(coro: Awaitable[Any], latencies: list[float]) -> None:
    t = time.perf_counter()
    await coro
    latencies.append(time.perf_counter() - t)


async def scale_round(count: int, attach: Callable[[int], Awaitable[Any]]) -> dict[str, Any]:
    """One concurrent 4-function attach on every VM; rate and latency."""
    latencies: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(timed(attach(i), latencies) for i in range(count)))
    wall = time.perf_counter() - t0
    return {"rate": count / wall, "latencies": latencies}


async def scale(work: Path, sizes: tuple[int, ...] = (50, 100, 300)) -> dict[str, Any]:
    """At each size, rounds alternate: qmpfd attaches a 4-function device on every VM at once
    (8 client connections), then raw QMP does the same on every VM's second monitor (one
    connection per VM, slots from the top so the two never meet)."""
    out = {}
    for count in sizes:
        d = work / f"scale{count}"
        d.mkdir()
        daemon = Daemon(d)
        procs = [start_bare_qemu(d, i) for i in range(count)]
        try:
            while not all(s.exists() and r.exists() for _, s, r in procs):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            rss0, cpu0 = daemon.usage()
            c = await client(daemon.sock)
            for i, (_, sock, _) in enumerate(procs):
                await c.execute("vm-add", {"name": f"s{i}", "qmp": str(sock)})
            rss1, cpu1 = daemon.usage()
            clients = [await client(daemon.sock) for _ in range(8)]
            raws = [await client(r) for _, _, r in procs]
            rounds: dict[str, list[dict[str, Any]]] = {"qmpfd": [], "raw": []}
            cpu_attach = 0.0
            for r in range(SCALE_ROUNDS):
                def via_qmpfd(i: int, r: int = r, cl: list[QMPClient] = clients
                              ) -> Awaitable[Any]:
                    return cl[i % len(cl)].execute("device-attach", {
                        "vm": f"s{i}", "functions": [
                            {"id": f"q{r}v{i}f{f}", "driver": "virtio-rng-pci"}
                            for f in range(4)]})

                def via_raw(i: int, r: int = r, rw: list[QMPClient] = raws) -> Awaitable[Any]:
                    ids = [f"w{r}v{i}f{f}" for f in range(4)]
                    return raw_plug4(rw[i], ids, 0x1F - r)
                if r % 2:   # alternate who goes first
                    rounds["raw"].append(await scale_round(count, via_raw))
                c0 = daemon.usage()[1]
                rounds["qmpfd"].append(await scale_round(count, via_qmpfd))
                cpu_attach += daemon.usage()[1] - c0
                if not r % 2:
                    rounds["raw"].append(await scale_round(count, via_raw))
            rss2, _ = daemon.usage()
            q = statistics.median(x["rate"] for x in rounds["qmpfd"])
            w = statistics.median(x["rate"] for x in rounds["raw"])
            qlat = [t for x in rounds["qmpfd"] for t in x["latencies"]]
            wlat = [t for x in rounds["raw"] for t in x["latencies"]]
            out[str(count)] = {
                "rounds": SCALE_ROUNDS,
                "qmpfd_rate": q, "raw_rate": w, "ratio": q / w,
                "qmpfd_rates": [x["rate"] for x in rounds["qmpfd"]],
                "raw_rates": [x["rate"] for x in rounds["raw"]],
                "p50": pct(qlat, 50), "p99": pct(qlat, 99),
                "raw_p50": pct(wlat, 50), "raw_p99": pct(wlat, 99),
                "rss_mb": rss2 / 2**20, "rss_per_vm_kb": (rss1 - rss0) / count / 1024,
                "cpu_s_per_vm_adopt": (cpu1 - cpu0) / count,
                "cpu_s_per_attach": cpu_attach / (count * SCALE_ROUNDS)}
            for cl in [*clients, *raws, c]:
                await cl.disconnect()
        finally:
            daemon.stop()
            for p, _, _ in procs:
                p.kill()
            for p, _, _ in procs:
                p.wait()
    return out


async def raw_plug4(c: QMPClient, ids: list[str], slot: int) -> None:
    await raw_plug(c, 4, ids, "pci.0", slot, drivers=["virtio-rng-pci"] * 4)


# -- 5. planner -----------------------------------------------------------------------------
def planner() -> dict[str, float]:
    out = {}
    for buses in (1, 4, 16, 64):
        raws = [RawBus(name=f"b{b}", path=f"/b{b}", bus_type="PCI", owner_type="pci-bridge",
                       owner_is_pci_device=True, handler_path="/acpi", handler_type="PIIX4_PM",
                       devices=tuple(RawDevice(f"/machine/peripheral/d{b}x{s}", "e1000", s << 3)
                                     for s in range(31)))
                for b in range(buses)]  # every slot but the last of every bus is taken
        topo = Topology.from_raw(raws)
        policies = {b.name: policy_for("x86_64", "pc", b.mechanism) for b in topo.buses}
        specs = [FunctionSpec(f"n{i}", "e1000", i) for i in range(8)]
        reps = 50
        t = time.perf_counter()
        table = SlotTable(topo)   # kept in memory per VM, as the daemon does
        for _ in range(reps):
            plan_attach(table, specs, policies)
        out[f"{buses}x32"] = (time.perf_counter() - t) / reps * 1e6
    return out


# -- 2. libvirt -----------------------------------------------------------------------------
def libvirt(work: Path) -> dict[str, Any]:
    script = Path(__file__).with_name("libvirt_bench.py")
    proc = subprocess.run([sys.executable, str(script), str(work / "libvirt"), str(RUNS)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def versions() -> dict[str, str]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.machine())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"machine": f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB",
            "kernel": platform.release(), "qemu": qemu, "python": platform.python_version()}


async def floor(work: Path) -> dict[str, Any]:
    """qmpfd against the floor relay (bench/floor_relay.py: qemu.qmp behind a Unix socket,
    nothing else) on one guest, rounds interleaved: CPU ms per 1-function attach and per
    attach+detach cycle, medians."""
    from bench.ab_cpu import LATENCY, FloorRelay, RawQmp, compare

    attach, cycle = await compare(work, {"qmpfd": Daemon, "floor": FloorRelay, "raw": RawQmp},
                                  6, 20)
    out: dict[str, Any] = {k: {"cpu_ms_per_attach": statistics.median(attach[k]) * 1000,
                               "cpu_ms_per_cycle": statistics.median(cycle[k]) * 1000,
                               "attach_ms": statistics.median(LATENCY[k]) * 1000}
                           for k in ("qmpfd", "floor")}
    out["raw"] = {"attach_ms": statistics.median(LATENCY["raw"]) * 1000}
    return out


async def main() -> None:
    from bench.report import write_report

    results: dict[str, Any] = {"versions": versions(), "runs": RUNS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qmpfd-bench-") as tmp:
        work = Path(tmp)
        daemon = Daemon(work)
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("overhead", lambda: overhead(work / "ovh", daemon)),
            ("unplug", lambda: unplug(work / "unp", daemon)),
        ]
        try:
            for name, fn in steps:
                print(f"bench: {name} ...", flush=True)
                results[name] = await fn()
        finally:
            daemon.stop()
        print("bench: libvirt ...", flush=True)
        results["libvirt"] = libvirt(work)
        print("bench: floor ...", flush=True)
        results["floor"] = await floor(work / "floor")
        print("bench: scale ...", flush=True)
        results["scale"] = await scale(work)
    print("bench: planner ...", flush=True)
    results["planner_us"] = planner()
    results["seconds"] = time.monotonic() - started
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out / "results.md", out / "chart.png")
    print(f"bench: done in {results['seconds']:.0f} s -> bench/results.md, bench/chart.png")


if __name__ == "__main__":
    asyncio.run(main())
