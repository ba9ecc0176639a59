"""Writes qmpfd-dashboard.json (Grafana, schema 39) from the panel list below: the one source of
the dashboard. Run after changing a panel; a unit test fails while the JSON is out of date, and
an integration test runs every panel's query on a real Prometheus scraping a real qmpfd.

    python3 contrib/grafana/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: (title, unit, [(query, legend)], width) in reading order; rows of 24 grid units
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Operations by kind, policy and result", "ops", [
        ('sum by (kind, policy, result) (rate(qmpfd_operations_total[$__rate_interval]))',
         "{{kind}} {{policy}} {{result}}")], 12),
    ("Failed operations (anything but ok)", "ops", [
        ('sum by (kind, policy, result) (rate(qmpfd_operations_total{result!="ok"}'
         '[$__rate_interval]))', "{{kind}} {{policy}} {{result}}")], 12),
    ("Phase latency p50 / p99", "s", [
        ('histogram_quantile(0.5, sum by (le, kind, phase) '
         '(rate(qmpfd_operation_phase_seconds_bucket[$__rate_interval])))',
         "p50 {{kind}} {{phase}}"),
        ('histogram_quantile(0.99, sum by (le, kind, phase) '
         '(rate(qmpfd_operation_phase_seconds_bucket[$__rate_interval])))',
         "p99 {{kind}} {{phase}}")], 12),
    ("Journal fdatasync p50 / p99", "s", [
        ('histogram_quantile(0.5, sum by (le) '
         '(rate(qmpfd_journal_sync_seconds_bucket[$__rate_interval])))', "p50"),
        ('histogram_quantile(0.99, sum by (le) '
         '(rate(qmpfd_journal_sync_seconds_bucket[$__rate_interval])))', "p99")], 12),
    ("VMs by link state", "short", [("sum by (link) (qmpfd_vms)", "{{link}}")], 8),
    ("Operations in flight", "short", [("sum (qmpfd_operations_in_flight)", "in flight")], 8),
    ("Journal write failures", "short", [
        ("sum (increase(qmpfd_journal_write_failures_total[$__range]))", "failed writes")], 8),
    ("Queued functions (waiting for function 0)", "short", [
        ("sum (qmpfd_queued_functions)", "queued")], 8),
    ("Orphaned slots", "short", [("sum (qmpfd_orphaned_slots)", "orphaned")], 8),
    ("Host functions held", "short", [("sum (qmpfd_host_functions_held)", "held")], 8),
]


def panel(n: int, title: str, unit: str, queries: list[tuple[str, str]], x: int, y: int,
          w: int) -> dict[str, Any]:
    return {
        "id": n + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(queries)],
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for n, (title, unit, queries, w) in enumerate(PANELS):
        if x + w > 24:
            x, y = 0, y + 8
        panels.append(panel(n, title, unit, queries, x, y, w))
        x += w
    return {
        "title": "qmpfd", "uid": "qmpfd", "schemaVersion": 39, "version": 1,
        "tags": ["qmpfd", "qemu", "hotplug"], "timezone": "", "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "type": "datasource", "query": "prometheus",
            "label": "Prometheus", "current": {}}]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "qmpfd-dashboard.json").write_text(render())
