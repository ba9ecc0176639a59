"""Prometheus/OpenMetrics metrics (prometheus_client), in a registry of qmpfd's own.

Counters and histograms are updated where things happen (operations, journal syncs); gauges
that describe state (VMs connected, queued functions, orphaned slots, host functions held) are
read from the daemon when scraped (:class:`StateCollector`), so they never drift from it.
Served only if ``[metrics] listen`` is set (see :mod:`qmpfd.api.metrics_http`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

OPERATIONS = Counter(
    "qmpfd_operations", "Attach and detach operations by kind, policy and result.",
    ["kind", "policy", "result"], registry=REGISTRY)
PHASE_SECONDS = Histogram(
    "qmpfd_operation_phase_seconds",
    "Time per phase of an operation: journal (the begin record; synced only where a crash "
    "needs it), qemu (device_add / "
    "device_del answered), guest (DEVICE_DELETED from the guest).",
    ["kind", "phase"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60))
JOURNAL_WRITE_FAILURES = Counter(
    "qmpfd_journal_write_failures", "Journal writes that failed (a full, read-only or vanished "
    "state directory): each refused a change or delayed a record.", registry=REGISTRY)
JOURNAL_SYNC_SECONDS = Histogram(
    "qmpfd_journal_sync_seconds", "fdatasync of the journal (one per group commit).",
    registry=REGISTRY,
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1))


# The labelled children, looked up once per label set: ``labels()`` takes a lock and builds a
# key on every call, and these are counted on every request.
_operations: dict[tuple[str, str, str], Counter] = {}
_phases: dict[tuple[str, str], Histogram] = {}


def operation(kind: str, policy: str, result: str) -> None:
    key = (kind, policy, result)
    child = _operations.get(key)
    if child is None:
        child = _operations[key] = OPERATIONS.labels(kind=kind, policy=policy, result=result)
    child.inc()


def phase(kind: str, name: str, seconds: float) -> None:
    child = _phases.get((kind, name))
    if child is None:
        child = _phases[kind, name] = PHASE_SECONDS.labels(kind=kind, phase=name)
    child.observe(seconds)


class StateCollector(Collector):
    """Gauges read from the daemon at scrape time."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        s = self._read()
        vms = GaugeMetricFamily("qmpfd_vms", "VMs managed, by link state.", labels=["link"])
        vms.add_metric(["up"], s["connected"])
        vms.add_metric(["down"], s["vms"] - s["connected"])
        yield vms
        yield GaugeMetricFamily("qmpfd_queued_functions",
                                "Functions queued in qmpfd waiting for function 0.",
                                value=s["queued"])
        yield GaugeMetricFamily("qmpfd_orphaned_slots",
                                "Slots holding non-zero functions without function 0.",
                                value=s["orphaned"])
        yield GaugeMetricFamily("qmpfd_host_functions_held",
                                "Host PCI functions held (on vfio-pci) for VMs.",
                                value=s["held"])
        yield GaugeMetricFamily("qmpfd_operations_in_flight",
                                "Attach and detach operations in flight (journaled).",
                                value=s["in_flight"])
