"""``tgi_adapter.prometheus.MetricsCollector``: a prometheus_client scrape equals ``render_prometheus()``.

Needs the ``prometheus`` extra; imported inside the fixture so that runs
without it deselect these tests (``-m "not integrations"``) without failing
to collect them.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, Callable, Dict, FrozenSet, Set, Tuple

import pytest

from tgi_adapter import AdapterConfig, MetricsRegistry, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError
from tgi_adapter.metrics import METRICS
from tgi_adapter.testing import FakeTgiServer, Fault

pytestmark = pytest.mark.integrations

MakeTask = Callable[..., TaskRequest]
Sample = Tuple[str, FrozenSet[Tuple[str, str]], float]
Families = Dict[str, Tuple[str, str, FrozenSet[Sample]]]
LABELS = {"engine": "tgi", "engine_version": "3.3.6", "pool_id": "p", "replica_id": "r"}


@pytest.fixture(name="prom")
def _prom() -> SimpleNamespace:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tgi_adapter.prometheus import MetricsCollector

    return SimpleNamespace(
        CollectorRegistry=CollectorRegistry,
        generate_latest=generate_latest,
        parse=text_string_to_metric_families,
        MetricsCollector=MetricsCollector,
    )


def parsed(prom: SimpleNamespace, text: str) -> Families:
    """Family name → (type, help, samples), as prometheus_client's own parser reads the text."""
    out: Families = {}
    for family in prom.parse(text):
        samples = frozenset((s.name, frozenset(s.labels.items()), float(s.value)) for s in family.samples)
        out[family.name] = (family.type, family.documentation, samples)
    return out


def scrape(prom: SimpleNamespace, collector_registry: Any) -> str:
    text: str = prom.generate_latest(collector_registry).decode("utf-8")
    return text


def value(families: Families, sample: str, **labels: str) -> float:
    for _kind, _help, samples in families.values():
        for sample_name, sample_labels, number in samples:
            if sample_name == sample and set(labels.items()) <= set(sample_labels):
                return number
    raise AssertionError(f"no sample {sample} {labels}")


def run_scripted_tasks(adapter: TgiHttpAdapter, engine: FakeTgiServer, make_task: MakeTask) -> None:
    """A success, a cancel after the first token, an error after a token and one before any."""
    text, end = adapter.submit(make_task()).collect()
    assert end["finish_reason"] == "length" and text
    stream = adapter.submit(make_task(max_tokens=50))
    assert next(stream).kind == "started" and next(stream).kind == "token"
    adapter.cancel(stream.task_id)
    assert [e.data.get("finish_reason") for e in stream] == ["cancelled"]
    engine.inject(Fault("error_frame", at_token=2, error_type="generation", message="Request failed during generation"))
    with pytest.raises(WorkerError) as failed:
        adapter.submit(make_task()).collect()
    assert failed.value.code.value == "INTERNAL"
    engine.inject(Fault("status", status=503))
    with pytest.raises(WorkerError) as refused:
        adapter.submit(make_task()).collect()
    assert refused.value.code.value == "POOL_UNREADY"
    adapter.health()


def test_a_scrape_equals_render_prometheus_after_success_cancel_and_errors(
    prom: SimpleNamespace, make_task: MakeTask
) -> None:
    config = AdapterConfig(retry=RetryPolicy(attempts=1), pool_id="p", replica_id="r")
    with FakeTgiServer(pace_s=0.005) as engine, TgiHttpAdapter(engine.url, config=config) as adapter:
        run_scripted_tasks(adapter, engine, make_task)
        registry = prom.CollectorRegistry()
        registry.register(prom.MetricsCollector(adapter.metrics))
        scraped = parsed(prom, scrape(prom, registry))
        rendered = parsed(prom, adapter.metrics.render_prometheus())
    assert scraped == rendered
    # Every scripted outcome is there, so the equality above compares something.
    assert value(scraped, "tasks_started_total") == 4
    assert value(scraped, "tasks_canceled_total") == 1
    assert value(scraped, "tasks_failed_total", code="INTERNAL") == 1
    assert value(scraped, "tasks_failed_total", code="POOL_UNREADY") == 1
    assert value(scraped, "engine_live") == 1
    assert value(scraped, "latency_first_token_ms_count") >= 1
    assert {"tasks_started", "tokens_out", "latency_first_token_ms", "latency_decode_ms", "engine_ready"} <= set(
        scraped
    )


def test_the_scrape_text_has_the_rendered_names_help_and_label_values(prom: SimpleNamespace) -> None:
    registry = MetricsRegistry()
    registry.task_started(LABELS)
    registry.observe("latency_first_token_ms", LABELS, 7)
    registry.inc("tasks_failed_total", LABELS, code="DECODE_TIMEOUT")
    collector_registry = prom.CollectorRegistry()
    collector_registry.register(prom.MetricsCollector(registry))
    text = scrape(prom, collector_registry)
    rendered = registry.render_prometheus()
    for line in rendered.splitlines():
        if line.startswith("#"):
            assert line in text  # HELP and TYPE lines, word for word
    assert 'le="5"' in text and 'le="+Inf"' in text and 'code="DECODE_TIMEOUT"' in text
    sample_lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(sample_lines) == len([line for line in rendered.splitlines() if not line.startswith("#")])


def test_the_collector_is_live_at_every_scrape(prom: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url) as adapter:
        collector_registry = prom.CollectorRegistry()
        collector_registry.register(prom.MetricsCollector(adapter.metrics))
        assert parsed(prom, scrape(prom, collector_registry)) == {}
        adapter.submit(make_task(max_tokens=5)).collect()
        first = parsed(prom, scrape(prom, collector_registry))
        adapter.submit(make_task(max_tokens=7)).collect()
        second = parsed(prom, scrape(prom, collector_registry))
        assert second == parsed(prom, adapter.metrics.render_prometheus())
    assert value(first, "tasks_started_total") == 1 and value(second, "tasks_started_total") == 2
    assert value(first, "tokens_out_total") == 5 and value(second, "tokens_out_total") == 12
    assert value(second, "streams_in_flight") == 0


def test_describe_names_every_family_so_clashes_are_refused(prom: SimpleNamespace) -> None:
    collector = prom.MetricsCollector(MetricsRegistry())
    described = {(family.name, family.type, family.documentation) for family in collector.describe()}
    # prometheus_client names a counter family without its "_total" suffix.
    expected = {
        (name.replace("_total", "") if kind == "counter" else name, kind, doc) for name, (kind, doc) in METRICS.items()
    }
    assert described == expected
    collector_registry = prom.CollectorRegistry()
    collector_registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        collector_registry.register(prom.MetricsCollector(MetricsRegistry()))


def test_the_collector_wants_a_metrics_registry(prom: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="MetricsRegistry"):
        prom.MetricsCollector({"not": "a registry"})


def test_each_scrape_is_one_consistent_snapshot(prom: SimpleNamespace) -> None:
    """A histogram's count, +Inf bucket and sum always agree, while another thread keeps observing."""
    registry = MetricsRegistry()
    collector_registry = prom.CollectorRegistry()
    collector_registry.register(prom.MetricsCollector(registry))
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            for _ in range(100):
                registry.observe("latency_decode_ms", LABELS, 3)

    thread = threading.Thread(target=observe)
    thread.start()
    seen: Set[float] = set()
    try:
        for _ in range(200):
            families = parsed(prom, scrape(prom, collector_registry))
            if "latency_decode_ms" not in families:
                continue
            count = value(families, "latency_decode_ms_count")
            assert value(families, "latency_decode_ms_bucket", le="+Inf") == count
            assert value(families, "latency_decode_ms_sum") == 3 * count
            seen.add(count)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 1  # the scrapes did interleave with the observations
