"""bench/results.md and bench/chart.png from the results of bench.py."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def _names(cmds: list[str]) -> str:
    """["device_add", "device_add"] -> "2x device_add"."""
    counts: dict[str, int] = {}
    for c in cmds:
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{k}" if v == 1 else f"{v}x {k}" for k, v in counts.items()) or "none"


def _targets(r: dict[str, Any]) -> list[str]:
    """The performance targets, each with this run's figure and whether it is met."""
    ovh = r["overhead"]

    def ratio(n: str) -> float:
        return float(ovh[n]["qmpfd"]["attach_qmp"]["median"]
                     / ovh[n]["raw"]["attach_qmp"]["median"])
    cmds = ovh.get("commands", {})
    exact = all(c["attach"] == ["device_add"] * int(n) for n, c in cmds.items() if n.isdigit())
    cpu1 = float(ovh["1"]["qmpfd_cpu_ms_per_attach"])
    rows = [("1-function attach <= 1.3x raw QMP", f"{ratio('1'):.2f}x", ratio("1") <= 1.3),
            ("2-function attach <= 1.35x raw QMP", f"{ratio('2'):.2f}x", ratio("2") <= 1.35),
            ("8-function attach <= 1.10x raw QMP", f"{ratio('8'):.2f}x", ratio("8") <= 1.10),
            ("qmpfd CPU per 1-function attach <= 0.5 ms", f"{cpu1:.2f} ms", cpu1 <= 0.5),
            ("exactly N device_adds, nothing else, per N-function attach",
             "yes" if exact else "no", exact)]
    rows += _scale_targets(r["scale"])
    out = ["", "### The performance targets in this run", "", "| target | this run | met |",
           "|---|---|---|"]
    out += [f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in rows]
    return [*out, "", *_floor(r.get("floor"))]


def _floor(floor: dict[str, Any] | None) -> list[str]:
    """The floor under the CPU target: what a relay with nothing but qemu.qmp behind a Unix
    socket costs on this machine, against qmpfd, rounds interleaved on one guest."""
    if not floor:
        return []
    q, f = floor["qmpfd"], floor["floor"]
    raw = float(floor["raw"]["attach_ms"])
    return [
        "### The floor under the CPU target", "",
        "`bench/floor_relay.py` speaks qmpfd's wire (vm-add, device-attach, device-detach) and",
        "relays each request to QEMU through qemu.qmp, with no journal, checks, events, audit",
        "or metrics: no asyncio daemon using qemu.qmp costs less on this machine. qmpfd and it",
        "take turns on one guest (rounds interleaved); CPU of each process, all threads.", "",
        "A third arm sends the same device_add by hand on its own monitor (raw QMP): the",
        "attach's time against it is the latency ratio the targets above ask of qmpfd.", "",
        "| | CPU ms per 1-function attach | CPU ms per attach+detach cycle | attach returns, "
        "ms (median) | vs raw QMP |",
        "|---|---|---|---|---|",
        *(f"| {name} | {x['cpu_ms_per_attach']:.2f} | {x['cpu_ms_per_cycle']:.2f} | "
          f"{x['attach_ms']:.2f} | {x['attach_ms'] / raw:.2f}x |" for name, x in
          (("qmpfd", q), ("floor relay", f))),
        f"| raw QMP | | | {raw:.2f} | 1.00x |",
        f"| qmpfd / floor | {q['cpu_ms_per_attach'] / f['cpu_ms_per_attach']:.2f}x | "
        f"{q['cpu_ms_per_cycle'] / f['cpu_ms_per_cycle']:.2f}x | "
        f"{q['attach_ms'] / f['attach_ms']:.2f}x | |", ""]


def _scale_targets(scale: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = []
    if "100" in scale:
        s = scale["100"]
        rows.append(("100 VMs: attach rate >= 0.95x raw QMP's", f"{s['ratio']:.2f}x",
                     s["ratio"] >= 0.95))
        p99 = s["p99"] / s["raw_p99"]
        rows.append(("100 VMs: p99 <= 1.2x raw QMP's p99", f"{p99:.2f}x", p99 <= 1.2))
    if "300" in scale:
        s = scale["300"]
        rows.append(("300 VMs: attach rate >= 0.9x raw QMP's", f"{s['ratio']:.2f}x",
                     s["ratio"] >= 0.9))
        rows.append(("300 VMs: RSS per VM <= 50 KB", f"{s['rss_per_vm_kb']:.0f} KB",
                     s["rss_per_vm_kb"] <= 50))
        if "50" in scale:
            growth = s["cpu_s_per_attach"] / scale["50"]["cpu_s_per_attach"]
            rows.append(("300 VMs: CPU per attach within 20% of 50 VMs'", f"{growth:.2f}x",
                         growth <= 1.2))
    return rows


def write_report(r: dict[str, Any], md: Path, png: Path) -> None:
    v = r["versions"]
    lines = [
        "# qmpfd benchmarks", "",
        f"Machine: {v['machine']}; kernel {v['kernel']}; {v['qemu']}; Python {v['python']}.",
        f"All guests under TCG. {r['runs']} runs per case, A/B interleaved. Whole run: "
        f"{r['seconds']:.0f} s. Produced by `bench/run`; raw numbers in bench/results.json.", "",
        "## 1. Overhead: qmpfd vs the same QMP sequence sent by hand (x86 pc, acpi-pcihp)", "",
        "One VM with three QMP monitors: qmpfd holds one, the hand-sent sequence (the non-zero",
        "functions' device_adds together, then function 0; one device_del) uses another, and a",
        "second qmpfd with its state dir on tmpfs (its journal's fdatasync costs nothing) the",
        "third; same slot, runs rotate. Times in ms, median (p95). *QMP done*: the attach call",
        "returns. *guest sees*: the guest's own PCI list shows every function.", "",
        "| N | qmpfd QMP done | raw QMP done | ratio | qmpfd, state on tmpfs | ratio | "
        "qmpfd CPU ms per attach | qmpfd guest sees | raw guest sees | qmpfd detach | "
        "raw detach |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    ovh = {n: res for n, res in r["overhead"].items() if n.isdigit()}
    for n, res in ovh.items():
        q, w, t = res["qmpfd"], res["raw"], res["tmpfs"]
        ratio = q["attach_qmp"]["median"] / w["attach_qmp"]["median"]
        ratio_t = t["attach_qmp"]["median"] / w["attach_qmp"]["median"]
        lines.append(
            f"| {n} | {_ms(q['attach_qmp']['median'])} ({_ms(q['attach_qmp']['p95'])}) | "
            f"{_ms(w['attach_qmp']['median'])} ({_ms(w['attach_qmp']['p95'])}) | "
            f"**{ratio:.2f}x** | {_ms(t['attach_qmp']['median'])} | {ratio_t:.2f}x | "
            f"{res['qmpfd_cpu_ms_per_attach']:.1f} | "
            f"{_ms(q['attach_guest']['median'])} | {_ms(w['attach_guest']['median'])} | "
            f"{_ms(q['detach']['median'])} | {_ms(w['detach']['median'])} |")
    lines += _targets(r)
    cmds = r["overhead"].get("commands", {})
    lines += ["", "### QMP commands qmpfd sent (counted by a logging proxy, not by qmpfd)", "",
              "| N | per attach | per whole-slot detach |", "|---|---|---|"]
    for n, c in cmds.items():
        if n.isdigit():
            lines.append(f"| {n} | {len(c['attach'])}: {_names(c['attach'])} | "
                         f"{len(c['detach'])}: {_names(c['detach'])} |")
    if "adopt" in cmds:
        lines += ["", f"Adopting the VM (once; topology read into memory): {len(cmds['adopt'])} "
                  f"commands ({_names(cmds['adopt'])})."]
    lines.append("")
    lv = r["libvirt"]
    lines += ["## 2. Against libvirt 9.0 (same kind of TCG guest)", ""]
    if "error" in lv:
        lines += [f"libvirt could not be measured: {lv['error']}", ""]
    else:
        one, eight = r["overhead"]["1"]["qmpfd"], r["overhead"]["8"]["qmpfd"]
        lines += [
            "| | attach returns (ms, median) | guest sees (ms, median) | detach (ms, median) |",
            "|---|---|---|---|",
            f"| libvirt {lv['libvirt']}, 1 function (attachDeviceFlags) | "
            f"{_ms(statistics.median(lv['attach_one']))} | "
            f"{_ms(statistics.median(lv['attach_one_guest']))} | "
            f"{_ms(statistics.median(lv['detach_one']))} |",
            f"| qmpfd, 1 function | {_ms(one['attach_qmp']['median'])} | "
            f"{_ms(one['attach_guest']['median'])} | {_ms(one['detach']['median'])} |",
            f"| qmpfd, 8 functions in one slot | {_ms(eight['attach_qmp']['median'])} | "
            f"{_ms(eight['attach_guest']['median'])} | {_ms(eight['detach']['median'])} |",
            "| libvirt, multifunction | refused (below) | | |", "",
            "What libvirt answers to the multifunction cases:", ""]
        lines += [f"- {case}: `{text}`" for case, text in lv["refused"].items()]
        lines.append("")
    lines += ["## 3. Unplug: time to the last DEVICE_DELETED (4 functions, q35)", "",
              "| policy | median ms | p95 ms |", "|---|---|---|"]
    for policy, s in r["unplug"].items():
        lines.append(f"| {policy} | {_ms(s['median'])} | {_ms(s['p95'])} |")
    lines += ["", "pcie-native includes Linux pciehp's 5 s attention-button window.", "",
              "## 4. Scale: one qmpfd, many VMs (QEMU held at start, no guest)", "",
              "Concurrent 4-function attaches on every VM, rounds alternating between qmpfd and",
              "raw QMP on each QEMU's second monitor (median of the rounds' rates).", "",
              "| VMs | qmpfd attaches/s | raw QMP attaches/s | ratio | qmpfd p50 / p99 ms | "
              "raw p50 / p99 ms | qmpfd RSS MB | RSS per VM KB | CPU ms per VM (adopt) | "
              "qmpfd CPU ms per attach |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n, s in r["scale"].items():
        lines.append(f"| {n} | {s['qmpfd_rate']:.1f} | {s['raw_rate']:.1f} | "
                     f"**{s['ratio']:.2f}x** | {_ms(s['p50'])} / {_ms(s['p99'])} | "
                     f"{_ms(s['raw_p50'])} / {_ms(s['raw_p99'])} | "
                     f"{s['rss_mb']:.0f} | {s['rss_per_vm_kb']:.0f} | "
                     f"{s['cpu_s_per_vm_adopt'] * 1000:.1f} | "
                     f"{s['cpu_s_per_attach'] * 1000:.1f} |")
    lines += ["", "## 5. The pure planner: 8-function plan against topology size", "",
              "| buses x slots | microseconds per plan |", "|---|---|"]
    lines += [f"| {k} | {us:.0f} |" for k, us in r["planner_us"].items()]
    md.write_text("\n".join(lines) + "\n")
    _chart(r, png)


def _chart(r: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ns = [n for n in r["overhead"] if n.isdigit()]
    x = range(len(ns))
    for i, (who, key) in enumerate((("qmpfd", "attach_qmp"), ("raw", "attach_qmp"),
                                    ("qmpfd", "attach_guest"), ("raw", "attach_guest"))):
        vals = [r["overhead"][n][who][key]["median"] * 1000 for n in ns]
        axes[0].bar([p + i * 0.2 - 0.3 for p in x], vals, width=0.2,
                    label=f"{who}: {'QMP done' if key == 'attach_qmp' else 'guest sees'}")
    axes[0].set_xticks(list(x), [f"{n} fn" for n in ns])
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("Attach: qmpfd vs raw QMP")
    axes[0].legend(fontsize=8)
    scale = r["scale"]
    pos = range(len(scale))
    axes[1].bar([p - 0.2 for p in pos], [s["qmpfd_rate"] for s in scale.values()], width=0.4,
                label="qmpfd")
    axes[1].bar([p + 0.2 for p in pos], [s["raw_rate"] for s in scale.values()], width=0.4,
                label="raw QMP")
    axes[1].set_xticks(list(pos), list(scale))
    axes[1].set_xlabel("VMs (one qmpfd)")
    axes[1].set_ylabel("4-function attaches per second")
    axes[1].set_title("Concurrent attaches on every VM")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
