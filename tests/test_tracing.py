"""OpenTelemetry: one CLIENT span "tgi.generate" per task, its ``traceparent`` at the engine.

Needs the ``otel`` extra and opentelemetry-sdk; they are imported inside the
fixture so that runs without them deselect these tests (``-m "not
integrations"``) without failing to collect them. Each test has its own
``TracerProvider`` (``TgiHttpAdapter(tracer_provider=...)``): no global state.
"""

from __future__ import annotations

import gc
import threading
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List

import pytest

from tgi_adapter import AdapterConfig, AdapterHost, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError
from tgi_adapter.testing import FakeTgiServer, Fault

pytestmark = pytest.mark.integrations

MakeTask = Callable[..., TaskRequest]
NO_RETRY = AdapterConfig(retry=RetryPolicy(attempts=1))


@pytest.fixture(name="otel")
def _otel() -> Iterator[SimpleNamespace]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def tasks() -> List[Any]:
        return [span for span in exporter.get_finished_spans() if span.name == "tgi.generate"]

    yield SimpleNamespace(provider=provider, tracer=provider.get_tracer("orchestrator"), tasks=tasks)
    provider.shutdown()


def traceparent_of(span: Any) -> str:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def generation_requests(engine: FakeTgiServer) -> List[Any]:
    return [r for r in engine.requests if r.path.startswith(("/generate", "/v1/"))]


def test_a_streamed_task_is_one_client_span_under_the_callers_context(
    otel: SimpleNamespace, make_task: MakeTask
) -> None:
    with FakeTgiServer(pace_s=0.002) as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        with otel.tracer.start_as_current_span("orchestrator") as parent:
            stream = adapter.submit(make_task(task_id="t-span", max_tokens=6, seed=7), correlation_id="c-1")
        text, end = stream.collect()
        version = adapter.engine_version()
    [span] = otel.tasks()
    assert span.kind.name == "CLIENT"
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.status.status_code.name == "UNSET"
    attributes = dict(span.attributes)
    assert attributes["gen_ai.system"] == "tgi"
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.max_tokens"] == 6
    assert attributes["gen_ai.request.seed"] == 7
    assert attributes["gen_ai.usage.input_tokens"] == end["tokens_in"]
    assert attributes["gen_ai.usage.output_tokens"] == end["tokens_out"] == 6
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["tgi.task_id"] == "t-span"
    assert attributes["tgi.correlation_id"] == "c-1"
    assert attributes["tgi.engine_version"] == version
    assert attributes["tgi.route"] == "native"
    assert "error.type" not in attributes
    [event] = span.events
    assert event.name == "first_token"
    assert span.start_time <= event.timestamp <= span.end_time
    assert text


def test_the_engine_receives_the_spans_traceparent(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        with otel.tracer.start_as_current_span("orchestrator"):
            adapter.submit(make_task(task_id="a")).collect()
            adapter.submit(make_task(task_id="b")).collect()
        requests = generation_requests(engine)
    spans = {span.attributes["tgi.task_id"]: span for span in otel.tasks()}
    assert [r.headers.get("traceparent") for r in requests] == [traceparent_of(spans["a"]), traceparent_of(spans["b"])]
    assert spans["a"].context.span_id != spans["b"].context.span_id


def test_a_task_with_no_current_span_is_a_root_span_and_still_sends_its_traceparent(
    otel: SimpleNamespace, make_task: MakeTask
) -> None:
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        adapter.submit(make_task()).collect()
        [request] = generation_requests(engine)
    [span] = otel.tasks()
    assert span.parent is None
    assert request.headers["traceparent"] == traceparent_of(span)


def test_generate_is_a_span_too(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        with otel.tracer.start_as_current_span("orchestrator") as parent:
            text, end = adapter.generate(make_task(task_id="g-1", max_tokens=5))
        [request] = generation_requests(engine)
    [span] = otel.tasks()
    assert request.path == "/generate" and request.headers["traceparent"] == traceparent_of(span)
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["tgi.task_id"] == "g-1"
    assert span.attributes["gen_ai.usage.output_tokens"] == end["tokens_out"] == 5
    assert span.attributes["gen_ai.response.finish_reasons"] == (end["finish_reason"],)
    assert span.status.status_code.name == "UNSET"
    assert [e.name for e in span.events] == []  # nothing arrives before the whole answer: no first token


def test_a_cancelled_task_is_not_an_error(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.01) as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        stream = adapter.submit(make_task(max_tokens=200))
        assert next(stream).kind == "started" and next(stream).kind == "token"
        adapter.cancel(stream.task_id)
        assert [event.data["finish_reason"] for event in stream] == ["cancelled"]
    [span] = otel.tasks()
    assert span.status.status_code.name == "UNSET"
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
    assert "error.type" not in span.attributes


def test_an_error_after_started_sets_status_error_with_the_code(otel: SimpleNamespace, make_task: MakeTask) -> None:
    fault = Fault("error_frame", at_token=2, error_type="generation", message="Request failed during generation")
    with FakeTgiServer(faults=[fault]) as engine, TgiHttpAdapter(
        engine.url, config=NO_RETRY, tracer_provider=otel.provider
    ) as adapter:
        with pytest.raises(WorkerError) as raised:
            adapter.submit(make_task()).collect()
    [span] = otel.tasks()
    assert raised.value.code.value == "INTERNAL"
    assert span.status.status_code.name == "ERROR"
    assert span.status.description == raised.value.message
    assert span.attributes["error.type"] == "INTERNAL"
    assert "gen_ai.response.finish_reasons" not in span.attributes
    assert [e.name for e in span.events] == ["first_token"]


def test_retries_are_events_on_the_one_span_and_share_its_traceparent(
    otel: SimpleNamespace, make_task: MakeTask
) -> None:
    config = AdapterConfig(retry=RetryPolicy(attempts=3))
    delays: List[float] = []
    with FakeTgiServer(faults=[Fault("status", status=503, times=2)]) as engine, TgiHttpAdapter(
        engine.url, config=config, tracer_provider=otel.provider, sleep=delays.append
    ) as adapter:
        adapter.submit(make_task()).collect()
        requests = generation_requests(engine)
    [span] = otel.tasks()
    retries = [event for event in span.events if event.name == "retry"]
    assert [dict(event.attributes) for event in retries] == [
        {"tgi.retry": n + 1, "tgi.retry_delay_ms": int(round(delay * 1000)), "error.type": "POOL_UNREADY"}
        for n, delay in enumerate(delays)
    ]
    assert len(retries) == 2
    assert [r.headers["traceparent"] for r in requests] == [traceparent_of(span)] * 3
    assert span.status.status_code.name == "UNSET"


def test_an_error_before_started_after_the_last_retry_is_the_spans_status(
    otel: SimpleNamespace, make_task: MakeTask
) -> None:
    config = AdapterConfig(retry=RetryPolicy(attempts=2))
    with FakeTgiServer(faults=[Fault("status", status=503, times=2)]) as engine, TgiHttpAdapter(
        engine.url, config=config, tracer_provider=otel.provider, sleep=lambda s: None
    ) as adapter:
        stream = adapter.submit(make_task())
        assert [event.kind for event in stream] == ["error"]
    [span] = otel.tasks()
    assert span.status.status_code.name == "ERROR" and span.attributes["error.type"] == "POOL_UNREADY"
    assert [e.name for e in span.events] == ["retry"]


def test_a_failed_generate_sets_status_error(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer(faults=[Fault("status", status=422)]) as engine, TgiHttpAdapter(
        engine.url, config=NO_RETRY, tracer_provider=otel.provider
    ) as adapter:
        with pytest.raises(WorkerError) as raised:
            adapter.generate(make_task())
    [span] = otel.tasks()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == raised.value.code.value == "INVALID_PARAMS"
    assert span.status.description == raised.value.full_message  # as the error event would say it


def test_tracing_off_makes_no_span_and_sends_no_traceparent(otel: SimpleNamespace, make_task: MakeTask) -> None:
    config = AdapterConfig(tracing=False)
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, config=config, tracer_provider=otel.provider) as adapter:
        with otel.tracer.start_as_current_span("orchestrator"):
            adapter.submit(make_task()).collect()
            adapter.generate(make_task())
        requests = generation_requests(engine)
    assert len(requests) == 2
    assert all("traceparent" not in r.headers and "tracestate" not in r.headers for r in requests)
    assert otel.tasks() == []


def test_the_openai_chat_route_is_a_chat_operation(otel: SimpleNamespace, make_task: MakeTask) -> None:
    config = AdapterConfig(route="openai-chat")
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, config=config, tracer_provider=otel.provider) as adapter:
        adapter.submit(make_task()).collect()
        [request] = generation_requests(engine)
    [span] = otel.tasks()
    assert span.attributes["gen_ai.operation.name"] == "chat" and span.attributes["tgi.route"] == "openai-chat"
    assert request.headers["traceparent"] == traceparent_of(span)


def test_the_span_ends_once_when_closed_from_another_thread(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.01) as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        stream = adapter.submit(make_task(max_tokens=500))
        first = next(stream)
        seen: List[str] = []
        reader = threading.Thread(target=lambda: seen.extend(event.kind for event in stream))
        reader.start()
        stream.close()
        reader.join(timeout=10)
        assert not reader.is_alive()
    assert first.kind == "started"
    [span] = otel.tasks()
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)


def test_closing_the_adapter_ends_the_spans_in_flight(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.01) as engine:
        adapter = TgiHttpAdapter(engine.url, tracer_provider=otel.provider)
        streams = [adapter.submit(make_task(max_tokens=500)) for _ in range(3)]
        assert all(next(stream).kind == "started" for stream in streams)
        adapter.close()
    spans = otel.tasks()
    assert sorted(s.attributes["tgi.task_id"] for s in spans) == sorted(s.task_id for s in streams)
    assert {s.attributes["gen_ai.response.finish_reasons"] for s in spans} == {("cancelled",)}


def test_a_stream_dropped_unfinished_ends_its_span(otel: SimpleNamespace, make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.01) as engine, TgiHttpAdapter(engine.url, tracer_provider=otel.provider) as adapter:
        stream = adapter.submit(make_task(max_tokens=500))
        assert next(stream).kind == "started"
        reader_done = stream._channel.reader_done
        del stream
        gc.collect()
        assert reader_done.wait(timeout=10)  # the dropped stream was cancelled and its task counted
        [span] = otel.tasks()
    assert span.attributes["gen_ai.response.finish_reasons"] == ("cancelled",)


def test_host_failover_shows_the_replicas_tried(otel: SimpleNamespace, make_task: MakeTask) -> None:
    """Each replica attempt is its own span under the submitter's context, naming the replicas tried so far."""
    with FakeTgiServer(faults=[Fault("status", status=503, times=5)]) as a, FakeTgiServer() as b:
        with AdapterHost() as host:
            host.bind("pool", "gpu-0", TgiHttpAdapter(a.url, config=NO_RETRY, tracer_provider=otel.provider))
            host.bind("pool", "gpu-1", TgiHttpAdapter(b.url, config=NO_RETRY, tracer_provider=otel.provider))
            with otel.tracer.start_as_current_span("orchestrator") as parent:
                stream = host.submit("pool", make_task(task_id="h-1"))
            # Routing happens where the first event is taken: another thread, with no context of its own.
            result: Dict[str, Any] = {}
            consumer = threading.Thread(target=lambda: result.update(end=stream.collect()[1]))
            consumer.start()
            consumer.join(timeout=10)
            assert stream.tried == ["gpu-0", "gpu-1"] and result["end"]["finish_reason"] == "length"
        [refused] = generation_requests(a)
        [served] = generation_requests(b)
    first, second = sorted(otel.tasks(), key=lambda span: span.start_time)
    for span in (first, second):
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.attributes["tgi.pool_id"] == "pool" and span.attributes["tgi.task_id"] == "h-1"
    assert first.attributes["tgi.replica_id"] == "gpu-0" and first.attributes["tgi.replica_attempt"] == 1
    assert first.attributes["tgi.replicas_tried"] == ("gpu-0",)
    assert first.status.status_code.name == "ERROR" and first.attributes["error.type"] == "POOL_UNREADY"
    assert second.attributes["tgi.replica_id"] == "gpu-1" and second.attributes["tgi.replica_attempt"] == 2
    assert second.attributes["tgi.replicas_tried"] == ("gpu-0", "gpu-1")
    assert second.status.status_code.name == "UNSET"
    assert refused.headers["traceparent"] == traceparent_of(first)
    assert served.headers["traceparent"] == traceparent_of(second)


class _CountingSpan:
    """Wraps a span and counts every method called on it."""

    def __init__(self, span: Any, calls: List[str]) -> None:
        self._span = span
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._span, name)
        if callable(attribute):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._calls.append(name)
                return attribute(*args, **kwargs)

            return counted
        return attribute


class _CountingProvider:
    """A TracerProvider whose spans count the calls made on them."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.calls: List[str] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        tracer = self.provider.get_tracer(*args, **kwargs)
        calls = self.calls
        return SimpleNamespace(start_span=lambda *a, **k: _CountingSpan(tracer.start_span(*a, **k), calls))


def test_no_span_work_per_token(otel: SimpleNamespace, make_task: MakeTask) -> None:
    """A 2,000-token stream touches its span exactly as often as a 2-token one."""
    counts = []
    with FakeTgiServer() as engine:
        for tokens in (2, 2000):
            provider = _CountingProvider(otel.provider)
            with TgiHttpAdapter(engine.url, tracer_provider=provider) as adapter:
                adapter.submit(make_task(max_tokens=tokens)).collect()
            counts.append(list(provider.calls))
    assert counts[0] == counts[1]
    assert "end" in counts[0] and counts[0].count("end") == 1


class _BrokenProvider:
    """A TracerProvider whose tracer fails to start spans."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        def start_span(*a: Any, **k: Any) -> Any:
            raise RuntimeError("tracer is broken")

        return SimpleNamespace(start_span=start_span)


def test_a_broken_tracer_never_fails_a_task(make_task: MakeTask) -> None:
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, tracer_provider=_BrokenProvider()) as adapter:
        text, end = adapter.submit(make_task(max_tokens=4)).collect()
        answer, _end = adapter.generate(make_task(max_tokens=4))
        requests = generation_requests(engine)
    assert end["tokens_out"] == 4 and text == answer
    assert [r.headers.get("traceparent") for r in requests] == [None, None]
