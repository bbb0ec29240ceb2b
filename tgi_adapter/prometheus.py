"""A prometheus_client collector over a :class:`~tgi_adapter.MetricsRegistry` (``pip install tgi-adapter[prometheus]``).

Register it in any ``CollectorRegistry`` and every scrape reads the adapter's
registry afresh: the same families, names, types, help, labels and values
as :meth:`~tgi_adapter.MetricsRegistry.render_prometheus`, taken from one
snapshot made under the registry's lock, so a scrape never mixes two moments.
"""

from __future__ import annotations

from typing import Iterable, List

try:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # the core never needs it; say which extra brings it
    raise ImportError(
        "tgi_adapter.prometheus needs prometheus_client: pip install tgi-adapter[prometheus]",
        name="prometheus_client",
    ) from exc

from .metrics import METRICS, MetricsRegistry, format_bound

__all__ = ["MetricsCollector"]


def _family(name: str, kind: str, help_text: str) -> Metric:
    if kind == "counter":
        # prometheus_client names a counter family without "_total" and writes
        # the suffix back on exposition; the samples keep the full name.
        return CounterMetricFamily(name, help_text)
    if kind == "histogram":
        return HistogramMetricFamily(name, help_text)
    return GaugeMetricFamily(name, help_text)


class MetricsCollector(Collector):
    """A ``prometheus_client`` custom collector exposing ``registry``, live at every scrape.

    :param registry: the :class:`~tgi_adapter.MetricsRegistry` to expose,
        e.g. ``adapter.metrics`` or one registry shared by many adapters.

    .. code-block:: text

        from prometheus_client import REGISTRY
        REGISTRY.register(MetricsCollector(adapter.metrics))
    """

    def __init__(self, registry: MetricsRegistry) -> None:
        if not isinstance(registry, MetricsRegistry):
            raise ValueError(f"registry must be a tgi_adapter MetricsRegistry, got {type(registry).__name__}")
        self.registry = registry

    def __repr__(self) -> str:
        return f"MetricsCollector({self.registry!r})"

    def describe(self) -> Iterable[Metric]:
        """Every family the registry can have (no samples), so a ``CollectorRegistry`` refuses clashing names."""
        return [_family(name, kind, help_text) for name, (kind, help_text) in METRICS.items()]

    def collect(self) -> Iterable[Metric]:
        """The registry's families with their current samples."""
        out: List[Metric] = []
        for name, kind, help_text, series in self.registry.families():
            family = _family(name, kind, help_text)
            add = family.add_sample
            for item in series:
                labels = item["labels"]
                if kind == "histogram":
                    for bound, count in item["buckets"]:
                        add(f"{name}_bucket", {**labels, "le": format_bound(bound)}, float(count))
                    add(f"{name}_sum", labels, float(item["sum"]))
                    add(f"{name}_count", labels, float(item["count"]))
                else:
                    add(name, labels, float(item["value"]))
            out.append(family)
        return out
