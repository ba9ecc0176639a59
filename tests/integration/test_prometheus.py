"""The dashboard and the alert rules against the real thing: Debian's Prometheus (unpacked by
scripts/setup) scrapes a real qmpfd that has just done real attaches and detaches on a booted
guest and a failed attach; every query of every dashboard panel returns data, and Prometheus
loads the alert rules. promtool checks the rules and runs their unit tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from lab.vm import LabVm, LabVmSpec
from tests.integration.conftest import connect, start_lab_vm
from tests.integration.faults_support import DaemonProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".cache" / "prometheus" / "usr" / "bin"
RULES = ROOT / "contrib" / "prometheus"
DASHBOARD = ROOT / "contrib" / "grafana" / "qmpfd-dashboard.json"
#: Grafana's macros, as a dashboard over the last few minutes would expand them
MACROS = {"$__rate_interval": "1m", "$__range": "10m"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def guest(workdir: Path) -> Iterator[LabVm]:
    vm = start_lab_vm(workdir, "prometheus-pc", LabVmSpec(machine="pc"))
    yield vm
    vm.stop()


def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    for args in (["check", "rules", "qmpfd-alerts.yml"],
                 ["test", "rules", "qmpfd-alerts.test.yml"]):
        out = subprocess.run([str(BIN / "promtool"), *args], cwd=RULES, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS" in out.stdout


def test_the_dashboard_json_is_generated_from_its_source() -> None:
    out = subprocess.run([sys.executable, str(DASHBOARD.with_name("make_dashboard.py"))],
                         capture_output=True, text=True, timeout=60, cwd="/",
                         env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert subprocess.run(["git", "diff", "--quiet", "--", str(DASHBOARD)], cwd=ROOT,
                          timeout=30).returncode == 0, "qmpfd-dashboard.json was edited by hand"


async def test_every_dashboard_query_returns_data_from_a_real_scrape(
        tmp_path: Path, guest: LabVm) -> None:
    metrics_port, prom_port = free_port(), free_port()
    d = DaemonProcess(tmp_path / "d", access_config=f'qmp-dirs = ["{guest.workdir}"]',
                      extra_config=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    d.start()
    prom = start_prometheus(tmp_path, metrics_port, prom_port)
    try:
        await until(lambda: scraped(prom_port), 60, "Prometheus never scraped qmpfd")
        before = await asyncio.to_thread(guest.wait_guest_pci, lambda _s: True)
        c = await connect(d.socket)
        await c.execute("vm-add", {"name": "g", "qmp": str(guest.qmp_socket)})
        funcs = [{"id": "pm0", "driver": "e1000"}, {"id": "pm1", "driver": "virtio-rng-pci"}]
        picture = os.environ.get("QMPFD_RENDER_DASHBOARD")   # docs/dashboard.png is made so
        for _ in range(20 if picture else 2):   # a picture wants a minute of history
            await c.execute("device-attach", {"vm": "g", "functions": funcs})
            await asyncio.to_thread(guest.wait_guest_pci, lambda s: len(s - before) == 2)
            await c.execute("device-detach", {"vm": "g", "ids": ["pm0", "pm1"]})
            await asyncio.to_thread(guest.wait_guest_pci, lambda s: s == before)
            # a scrape between rounds: the series exist before the next round raises them, so
            # rate() sees an increase (a series first scraped with its final count has none)
            done = time.time()
            await until(lambda t=done: scraped(prom_port, after=t), 60, "no scrape yet")
        with pytest.raises(ExecuteError):
            await c.execute("device-attach", {"vm": "g", "functions": [
                {"id": "bad0", "driver": "e1000"},
                {"id": "bad1", "driver": "virtio-rng-pci", "properties": {"rng": "nosuch"}}]})
        await c.qmp.disconnect()
        seen = time.time()
        await until(lambda: scraped(prom_port, after=seen), 60, "no scrape after the operations")
        empty = []
        for p in json.loads(DASHBOARD.read_text())["panels"]:
            for target in p["targets"]:
                expr = target["expr"]
                for macro, value in MACROS.items():
                    expr = expr.replace(macro, value)
                result = await asyncio.to_thread(api, prom_port, "query", query=expr)
                values = [float(r["value"][1]) for r in result["result"]]
                if not values or all(v != v for v in values):     # none, or only NaN
                    empty.append(f"{p['title']}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        failed = await asyncio.to_thread(api, prom_port, "query", query=(
            'sum(qmpfd_operations_total{kind="attach", result!="ok"})'))
        assert float(failed["result"][0]["value"][1]) >= 1, "the failed attach was not counted"
        if picture:
            sys.path.insert(0, str(DASHBOARD.parent))
            from render_panels import render
            await asyncio.to_thread(render, f"http://127.0.0.1:{prom_port}", Path(picture), 1.5)
        rules = await asyncio.to_thread(api, prom_port, "rules")
        names = {r["name"] for g in rules["groups"] for r in g["rules"]}
        assert names == {"QmpfdOrphanedSlot", "QmpfdJournalWriteFailing", "QmpfdVmLinkDown",
                         "QmpfdUnplugTimeouts"}
        assert all(r["health"] in ("ok", "unknown") for g in rules["groups"]
                   for r in g["rules"]), rules
    finally:
        prom.terminate()
        prom.wait(30)
        d.stop()


def start_prometheus(work: Path, target_port: int, port: int) -> subprocess.Popen[bytes]:
    """Prometheus scraping qmpfd every second, with qmpfd's alert rules loaded."""
    (work / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES / 'qmpfd-alerts.yml'}\n"
        "scrape_configs:\n  - job_name: qmpfd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n")
    return subprocess.Popen(
        [str(BIN / "prometheus"), f"--config.file={work / 'prometheus.yml'}",
         f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "prometheus.log").open("wb"))


def scraped(port: int, after: float = 0.0) -> bool:
    """Whether Prometheus has scraped qmpfd successfully, more than 1 s after ``after`` (a Unix
    time): that scrape saw everything done before ``after``."""
    try:
        targets = api(port, "targets")["activeTargets"]
    except OSError:
        return False
    return any(t["health"] == "up" and unix_time(t["lastScrape"]) > after + 1 for t in targets)


def unix_time(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, Z) as Unix time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


async def until(cond: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)
