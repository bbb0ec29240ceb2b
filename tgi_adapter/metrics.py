"""The stdlib-logging metrics shim: per-task log records and an in-process registry.

No metrics dependency: each finished task is one INFO record on the
``tgi_adapter.metrics`` logger carrying the orchestrator's standard fields in
``record.task`` (a dict), and the same facts feed a small thread-safe
registry of counters, histograms and gauges that renders Prometheus text.
Labels are ``engine``, ``engine_version``, ``pool_id`` and ``replica_id``
only: task ids never become labels, so cardinality stays bounded.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "TaskRecord",
    "MetricsRegistry",
    "Family",
    "format_value",
    "format_bound",
    "LABEL_NAMES",
    "FIRST_TOKEN_BUCKETS_MS",
    "DECODE_BUCKETS_MS",
    "METRICS",
]

#: The logger of the per-task records.
metrics_log = logging.getLogger("tgi_adapter.metrics")

LABEL_NAMES = ("engine", "engine_version", "pool_id", "replica_id")
# Gauges describe the engine now, not the version a task ran on: a version
# label would leave a stale series behind after every upgrade.
GAUGE_LABEL_NAMES = ("engine", "pool_id", "replica_id")
#: Upper bounds (ms) of ``latency_first_token_ms`` buckets (``+Inf`` is implied).
FIRST_TOKEN_BUCKETS_MS: Tuple[float, ...] = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000,
)
#: Upper bounds (ms) of ``latency_decode_ms`` buckets (``+Inf`` is implied).
DECODE_BUCKETS_MS: Tuple[float, ...] = (
    10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000,
)

#: name → (type, help), in the order they are rendered.
METRICS: Dict[str, Tuple[str, str]] = {
    "tasks_started_total": ("counter", "Tasks submitted to the engine."),
    "tasks_canceled_total": ("counter", "Tasks cancelled by the orchestrator."),
    "tasks_failed_total": ("counter", "Tasks that ended with an error, by code."),
    "tokens_in_total": ("counter", "Prompt tokens reported by the engine."),
    "tokens_out_total": ("counter", "Generated tokens reported by the engine."),
    "retries_total": ("counter", "Retries made before a task started streaming."),
    "latency_first_token_ms": ("histogram", "Milliseconds from submit to the first token."),
    "latency_decode_ms": ("histogram", "Milliseconds from the first token to the end."),
    "engine_live": ("gauge", "1 when the engine answered its last health check."),
    "engine_ready": ("gauge", "1 when the engine reported ready at its last health check."),
    "streams_in_flight": ("gauge", "Tasks whose terminal event has not been taken yet."),
}

Labels = Tuple[Tuple[str, str], ...]


class Family(NamedTuple):
    """One metric family with its series, as :meth:`MetricsRegistry.families` returns it.

    ``series`` items are those of :meth:`MetricsRegistry.snapshot`.
    """

    name: str
    kind: str
    help: str
    series: List[Dict[str, Any]]


@dataclass(frozen=True)
class TaskRecord:
    """The orchestrator's standard fields for one finished task."""

    job_id: str
    session_id: Optional[str]
    engine: str
    engine_version: Optional[str]
    pool_id: Optional[str]
    replica_id: Optional[str]
    tokens_in: Optional[int]
    tokens_out: Optional[int]
    decode_time_ms: Optional[int]
    latency_first_token_ms: Optional[int]
    outcome: str
    retries: int
    correlation_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (what ``record.task`` holds)."""
        return dict(vars(self))  # every field is a plain value: no deep copy needed


class _Histogram:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for n, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[n] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


Hook = Callable[[str, Mapping[str, str], Any], None]


class MetricsRegistry:
    """Counters, histograms and gauges fed by adapters; thread-safe.

    One registry may be shared by many adapters (their labels tell them
    apart). :meth:`add_hook` forwards every observation to your own system.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Dict[Tuple[str, Labels], float] = {}
        self._gauges: Dict[Tuple[str, Labels], float] = {}
        self._histograms: Dict[Tuple[str, Labels], _Histogram] = {}
        self._hooks: List[Hook] = []

    # -- feeding -------------------------------------------------------------

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(name, labels, value)`` for each observation (value is a
        number, or the :class:`TaskRecord` for ``"task_finished"``)."""
        self._hooks.append(hook)

    def _emit(self, name: str, labels: Mapping[str, str], value: Any) -> None:
        for hook in self._hooks:
            try:
                hook(name, labels, value)
            except Exception:  # a user's hook must never break a stream
                metrics_log.debug("metrics hook failed", exc_info=True)

    @staticmethod
    def _key(
        labels: Mapping[str, str], extra: Sequence[Tuple[str, str]] = (), names: Sequence[str] = LABEL_NAMES
    ) -> Labels:
        return tuple((name, str(labels.get(name) or "")) for name in names) + tuple(extra)

    def inc(self, name: str, labels: Mapping[str, str], value: float = 1.0, **extra: str) -> None:
        key = (name, self._key(labels, sorted(extra.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value
        self._emit(name, labels, value)

    def set_gauge(self, name: str, labels: Mapping[str, str], value: float) -> None:
        key = (name, self._key(labels, names=GAUGE_LABEL_NAMES))
        with self._lock:
            self._gauges[key] = value
        self._emit(name, labels, value)

    def add_gauge(self, name: str, labels: Mapping[str, str], delta: float) -> None:
        key = (name, self._key(labels, names=GAUGE_LABEL_NAMES))
        with self._lock:
            self._gauges[key] = self._gauges.get(key, 0.0) + delta
            value = self._gauges[key]
        self._emit(name, labels, value)

    def observe(self, name: str, labels: Mapping[str, str], value: float) -> None:
        bounds = FIRST_TOKEN_BUCKETS_MS if name == "latency_first_token_ms" else DECODE_BUCKETS_MS
        key = (name, self._key(labels))
        with self._lock:
            histogram = self._histograms.get(key)
            if histogram is None:
                histogram = self._histograms[key] = _Histogram(bounds)
            histogram.observe(value)
        self._emit(name, labels, value)

    def task_started(self, labels: Mapping[str, str]) -> None:
        """A task was submitted."""
        self.inc("tasks_started_total", labels)
        self.add_gauge("streams_in_flight", labels, 1)

    def task_finished(self, labels: Mapping[str, str], record: TaskRecord) -> None:
        """A task's terminal event was taken: count it and log its record."""
        self.add_gauge("streams_in_flight", labels, -1)
        outcome = record.outcome
        if outcome == "cancelled":
            self.inc("tasks_canceled_total", labels)
        elif outcome != "end":
            self.inc("tasks_failed_total", labels, code=outcome)
        if record.tokens_in:
            self.inc("tokens_in_total", labels, record.tokens_in)
        if record.tokens_out:
            self.inc("tokens_out_total", labels, record.tokens_out)
        if record.retries:
            self.inc("retries_total", labels, record.retries)
        if record.latency_first_token_ms is not None:
            self.observe("latency_first_token_ms", labels, record.latency_first_token_ms)
        if record.decode_time_ms is not None and outcome == "end":
            self.observe("latency_decode_ms", labels, record.decode_time_ms)
        self._emit("task_finished", labels, record)
        if metrics_log.isEnabledFor(logging.INFO):
            metrics_log.info(
                "task %s %s: %s tokens out, first token %s ms, %d retries",
                record.job_id,
                outcome,
                record.tokens_out,
                record.latency_first_token_ms,
                record.retries,
                extra={"task": record.to_dict()},
            )

    def set_health(self, labels: Mapping[str, str], live: bool, ready: bool) -> None:
        """The result of a health check."""
        self.set_gauge("engine_live", labels, 1.0 if live else 0.0)
        self.set_gauge("engine_ready", labels, 1.0 if ready else 0.0)

    # -- reading -----------------------------------------------------------------

    def snapshot(self) -> Dict[str, List[Dict[str, Any]]]:
        """Every series as plain data: ``{name: [{"labels": {...}, "value": ...}]}``.

        Histograms give ``{"labels", "buckets": [[bound, cumulative], ...], "sum", "count"}``.
        """
        out: Dict[str, List[Dict[str, Any]]] = {}
        with self._lock:
            for (name, labels), value in sorted(self._counters.items()):
                out.setdefault(name, []).append({"labels": dict(labels), "value": value})
            for (name, labels), value in sorted(self._gauges.items()):
                out.setdefault(name, []).append({"labels": dict(labels), "value": value})
            for (name, labels), hist in sorted(self._histograms.items(), key=lambda kv: kv[0]):
                cumulative = 0
                buckets: List[List[float]] = []
                for bound, count in zip(list(hist.bounds) + [math.inf], hist.counts):
                    cumulative += count
                    buckets.append([bound, cumulative])
                out.setdefault(name, []).append(
                    {"labels": dict(labels), "buckets": buckets, "sum": hist.sum, "count": hist.count}
                )
        return out

    def families(self) -> List[Family]:
        """The families that have series, in exposition order, all from one snapshot.

        What :meth:`render_prometheus` writes and what
        :class:`tgi_adapter.prometheus.MetricsCollector` hands to prometheus_client.
        """
        snap = self.snapshot()
        return [
            Family(name, kind, help_text, snap[name]) for name, (kind, help_text) in METRICS.items() if snap.get(name)
        ]

    def render_prometheus(self) -> str:
        """The registry in Prometheus text exposition format (version 0.0.4)."""
        lines: List[str] = []
        for name, kind, help_text, series in self.families():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for item in series:
                labels = item["labels"]
                if kind == "histogram":
                    for bound, count in item["buckets"]:
                        lines.append(f"{name}_bucket{_labels(labels, ('le', format_bound(bound)))} {count}")
                    lines.append(f"{name}_sum{_labels(labels)} {format_value(item['sum'])}")
                    lines.append(f"{name}_count{_labels(labels)} {item['count']}")
                else:
                    lines.append(f"{name}{_labels(labels)} {format_value(item['value'])}")
        return "\n".join(lines) + "\n" if lines else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str], *extra: Tuple[str, str]) -> str:
    items = list(labels.items()) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"


def format_bound(bound: float) -> str:
    """A histogram bucket's ``le`` label value: ``"5"``, ``"2.5"``, ``"+Inf"``."""
    return "+Inf" if math.isinf(bound) else format_value(bound)


def format_value(value: float) -> str:
    """A sample value as the text format writes it (integral values without ``.0``)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
