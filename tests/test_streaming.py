"""Streaming, cancel and connection handling against the real-socket fake engine."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest

from tgi_adapter import AdapterConfig, ErrorKind, TaskRequest, TgiHttpAdapter, TokenEvent, WorkerError, runtime
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]


def check_invariants(events: List[TokenEvent]) -> None:
    """DESIGN §2: started once before the first token or end; i counts; one terminal, last."""
    kinds = [e.kind for e in events]
    assert kinds, "no events"
    terminal = [k for k in kinds if k in ("end", "error")]
    assert len(terminal) == 1 and kinds[-1] in ("end", "error"), kinds
    if kinds == ["error"]:
        return
    assert kinds[0] == "started" and kinds.count("started") == 1, kinds
    tokens = [e for e in events if e.kind == "token"]
    assert [t.data["i"] for t in tokens] == list(range(len(tokens)))
    assert all(isinstance(t.data["t"], str) and t.data["t"] for t in tokens)
    if "metrics" in kinds:
        assert kinds.index("metrics") == len(kinds) - 2


def text_of(events: List[TokenEvent]) -> str:
    return "".join(e.data["t"] for e in events if e.kind == "token")


@pytest.fixture(name="server")
def _server() -> Iterator[FakeTgiServer]:
    with FakeTgiServer() as server:
        yield server


@pytest.fixture(name="adapter")
def _adapter(server: FakeTgiServer) -> Iterator[TgiHttpAdapter]:
    with TgiHttpAdapter(server.url) as adapter:
        yield adapter


@pytest.mark.parametrize("version", ["0.9.4", "2.0.4", "2.2.0", "3.3.6"])
def test_every_era_streams_with_the_invariants(version: str, make_task: MakeTask) -> None:
    with FakeTgiServer(version=version) as server, TgiHttpAdapter(server.url) as adapter:
        task = make_task(max_tokens=12, prompt="What is deep learning?")
        events = list(adapter.submit(task))
        check_invariants(events)
        text, end = adapter.generate(make_task(max_tokens=12, prompt="What is deep learning?"))
    assert [e.kind for e in events][-2:] == ["metrics", "end"]
    assert text_of(events) == text  # greedy, so the same text both ways
    data = events[-1].data
    assert data["tokens_out"] == 12 and data["finish_reason"] == "length"
    assert data["engine_version"] == events[0].data["engine_version"]
    expect_input_length = version >= "2.3"
    assert (data["tokens_in"] is not None) == expect_input_length
    sent = server.requests[-2]
    assert sent.path == "/generate_stream"
    assert sent.json["parameters"]["details"] is True
    assert sent.json["parameters"]["max_new_tokens"] == 12


def test_eos_and_split_utf8_tokens_keep_text_equal_to_the_engines(make_task: MakeTask) -> None:
    with FakeTgiServer(eos_after=9, utf8_split=True) as server, TgiHttpAdapter(server.url) as adapter:
        events = list(adapter.submit(make_task(max_tokens=30)))
        reference, _ = adapter.generate(make_task(max_tokens=30))
    check_invariants(events)
    assert text_of(events) == reference
    assert events[-1].data["finish_reason"] == "eos_token"
    assert "</s>" not in text_of(events)


def test_one_byte_writes_and_keepalives_give_the_same_events(make_task: MakeTask) -> None:
    def run(**kwargs: Any) -> List[Any]:
        with FakeTgiServer(**kwargs) as server, TgiHttpAdapter(server.url) as adapter:
            events = list(adapter.submit(make_task(max_tokens=6, seed=3)))
        check_invariants(events)
        return [(e.kind, e.data) for e in events if e.kind == "token"] + [events[-1].data["finish_reason"]]

    whole = run()
    assert len(whole) == 7
    assert run(split_writes=1) == whole
    assert run(prefill_s=0.25, keepalive_s=0.05) == whole


def test_cancel_while_the_engine_is_silent_takes_effect_at_once(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    server.inject(Fault("stall", at_token=2))
    task = make_task(max_tokens=50)
    stream = adapter.submit(task)
    first = [next(stream), next(stream), next(stream)]
    assert [e.kind for e in first] == ["started", "token", "token"]
    assert server.in_flight == 1
    t0 = time.monotonic()
    adapter.cancel(task.task_id)  # the reader is blocked in recv now
    rest = list(stream)
    assert server.wait_for_disconnect(timeout=5.0)
    seen = server.disconnects[-1].t - t0
    assert [e.kind for e in rest] == ["end"]
    assert rest[0].data["finish_reason"] == "cancelled"
    assert seen < 0.5, f"the engine saw the disconnect after {seen:.3f}s"
    assert stream.join(timeout=2.0)


def test_cancel_before_the_first_token_gives_started_then_cancelled(make_task: MakeTask) -> None:
    with FakeTgiServer(prefill_s=30.0) as server, TgiHttpAdapter(server.url) as adapter:
        task = make_task()
        stream = adapter.submit(task)
        assert server.wait_for_requests(2, timeout=5.0)  # /info, then the stream
        adapter.cancel(task.task_id)
        events = list(stream)
        assert server.wait_for_disconnect(timeout=5.0)
    assert [e.kind for e in events] == ["started", "end"]
    assert events[1].data["finish_reason"] == "cancelled"


def test_no_token_after_cancel_returns(make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.002) as server, TgiHttpAdapter(server.url) as adapter:
        task = make_task(max_tokens=400)
        stream = adapter.submit(task)
        taken = [next(stream) for _ in range(4)]
        adapter.cancel(task.task_id)
        after = list(stream)
    assert [e.kind for e in taken] == ["started", "token", "token", "token"]
    assert [e.kind for e in after] == ["end"]
    assert list(stream) == []  # a finished stream yields nothing more


def test_cancel_is_idempotent_and_unknown_ids_are_fine(adapter: TgiHttpAdapter, make_task: MakeTask) -> None:
    adapter.cancel("never-submitted")
    task = make_task(max_tokens=3)
    stream = adapter.submit(task)
    adapter.cancel(task.task_id)
    adapter.cancel(task.task_id)
    stream.cancel()
    assert [e.kind for e in stream] == ["started", "end"]
    adapter.cancel(task.task_id)


def test_a_finished_engine_stream_can_still_be_cancelled_until_the_end_is_taken(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    task = make_task(max_tokens=20)
    stream = adapter.submit(task)
    assert stream.join(timeout=5.0)  # the reader has put every event, end included
    adapter.cancel(task.task_id)
    events = list(stream)
    assert [e.kind for e in events] == ["started", "end"]
    assert events[-1].data["finish_reason"] == "cancelled"


def test_close_and_the_context_manager_cancel_and_release(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    server.inject(Fault("stall", at_token=1))
    with adapter.submit(make_task(max_tokens=10)) as stream:
        assert next(stream).kind == "started"
    assert stream.cancelled and adapter.in_flight == 0
    assert server.wait_for_disconnect(timeout=5.0)
    # The terminal event is still there for whoever iterates next, exactly once.
    assert [e.data["finish_reason"] for e in stream] == ["cancelled"]
    assert stream.finished and list(stream) == []


def test_adapter_close_cancels_everything_in_flight(make_task: MakeTask) -> None:
    with FakeTgiServer(pace_s=0.01) as server:
        adapter = TgiHttpAdapter(server.url)
        streams = [adapter.submit(make_task(max_tokens=500)) for _ in range(3)]
        for stream in streams:
            assert next(stream).kind == "started"
        adapter.close()
        assert server.wait_for_disconnect(timeout=5.0, count=3)
        for stream in streams:
            assert stream.join(timeout=5.0)
        with pytest.raises(WorkerError) as info:
            adapter.submit(make_task())
        assert info.value.code is ErrorKind.POOL_UNAVAILABLE


def test_no_thread_or_socket_leaks_after_100_submit_cancel_cycles(make_task: MakeTask) -> None:
    baseline = threading.active_count()
    with FakeTgiServer(pace_s=0.001) as server, TgiHttpAdapter(server.url) as adapter:
        for _ in range(100):
            task = make_task(max_tokens=1000)
            stream = adapter.submit(task)
            assert next(stream).kind == "started"
            adapter.cancel(task.task_id)
            assert [e.kind for e in stream][-1] == "end"
            assert stream.join(timeout=5.0)
        assert adapter.in_flight == 0
        assert server.wait_for_disconnect(timeout=10.0, count=100)
        # No thread per stream: the shared reader and a few send workers at most, plus the
        # server's acceptor and its live connection.
        library = [t.name for t in threading.enumerate() if t.name.startswith("tgi-")]
        assert all(name == "tgi-adapter-reader" or name.startswith("tgi-adapter-worker-") for name in library)
        assert threading.active_count() <= baseline + 2 + len(library)
        assert len(library) <= 1 + runtime.MAX_WORKERS


def test_sequential_tasks_reuse_one_connection(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    for _ in range(5):
        list(adapter.submit(make_task(max_tokens=5)))
    adapter.generate(make_task(max_tokens=5))
    adapter.health()
    assert server.connections_accepted == 1


def test_a_cancelled_stream_never_returns_its_connection(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    list(adapter.submit(make_task(max_tokens=5)))
    server.inject(Fault("stall", at_token=1))
    task = make_task(max_tokens=5)
    stream = adapter.submit(task)
    next(stream)
    stream.close()
    list(adapter.submit(make_task(max_tokens=5)))
    assert server.connections_accepted == 2


def test_a_task_id_cannot_be_in_flight_twice(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    server.inject(Fault("stall", at_token=1))
    task = make_task()
    with adapter.submit(task) as stream:
        assert next(stream).kind == "started"
        with pytest.raises(WorkerError) as info:
            adapter.submit(task)
        assert info.value.code is ErrorKind.INVALID_PARAMS
    assert [e.kind for e in adapter.submit(task)][-1] == "end"  # free again once finished


def test_correlation_id_goes_to_the_engine_and_into_started(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    events = list(adapter.submit(make_task(max_tokens=2), correlation_id="corr-42"))
    assert events[0].data["correlation_id"] == "corr-42"
    assert server.requests[-1].headers["x-correlation-id"] == "corr-42"
    events = list(adapter.submit(make_task(max_tokens=2)))
    generated = events[0].data["correlation_id"]
    assert len(generated) == 36 and server.requests[-1].headers["x-correlation-id"] == generated


def test_collect_returns_text_and_end_or_raises(
    server: FakeTgiServer, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    text, end = adapter.submit(make_task(max_tokens=4)).collect()
    assert text and end["tokens_out"] == 4
    server.inject(Fault("error_frame", at_token=0, error_type="validation"))
    with pytest.raises(WorkerError) as info:
        adapter.submit(make_task()).collect()
    assert info.value.code is ErrorKind.INVALID_PARAMS


def test_many_concurrent_streams_through_one_adapter(make_task: MakeTask) -> None:
    with (
        FakeTgiServer(pace_s=0.002) as server,
        TgiHttpAdapter(server.url, config=AdapterConfig(pool_maxsize=8)) as adapter,
    ):
        results: Dict[str, Any] = {}

        def consume(n: int) -> None:
            results[f"w{n}"] = list(adapter.submit(make_task(task_id=f"w{n}", max_tokens=40)))

        workers = [threading.Thread(target=consume, args=(n,)) for n in range(24)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30.0)
    assert len(results) == 24
    for events in results.values():
        check_invariants(events)
        assert events[-1].data["tokens_out"] == 40
