"""StreamSet: one thread consumes many streams of any adapter, each stream keeping the contract."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List

import pytest

from tgi_adapter import (
    AdapterConfig,
    AdapterHost,
    StreamSet,
    TaskRequest,
    TgiHttpAdapter,
    TokenEvent,
    TokenStream,
)
from tgi_adapter.stream import StreamChannel
from tgi_adapter.testing import FakeTgiServer, Fault, MockAdapter

from test_streaming import check_invariants

MakeTask = Callable[..., TaskRequest]


def gather(streams: StreamSet) -> Dict[str, List[TokenEvent]]:
    by_task: Dict[str, List[TokenEvent]] = defaultdict(list)
    for stream, event in streams:
        by_task[stream.task_id].append(event)
    return by_task


@pytest.fixture(name="server")
def _server() -> Iterator[FakeTgiServer]:
    with FakeTgiServer(pace_s=0.001) as server:
        yield server


def test_each_stream_keeps_its_order_and_text(server: FakeTgiServer, make_task: MakeTask) -> None:
    with TgiHttpAdapter(server.url) as adapter:
        tasks = [make_task(max_tokens=n, prompt=f"prompt {n}") for n in (3, 9, 17, 30)]
        alone = {t.task_id: adapter.submit(t).collect()[0] for t in tasks}  # the same prompts, read directly
        again = [make_task(max_tokens=t.max_tokens, prompt=t.prompt) for t in tasks]
        with StreamSet(adapter.submit(t) for t in again) as streams:
            assert len(streams) == 4
            got = gather(streams)
            assert len(streams) == 0
    for task, first in zip(again, tasks):
        events = got[task.task_id]
        check_invariants(events)
        assert "".join(e.data["t"] for e in events if e.kind == "token") == alone[first.task_id]
        assert events[-1].data["tokens_out"] == task.max_tokens


def test_a_mix_of_adapters_hosts_and_mocks(server: FakeTgiServer, make_task: MakeTask) -> None:
    with FakeTgiServer() as other, TgiHttpAdapter(server.url) as adapter, AdapterHost() as host:
        host.bind("pool", "r1", TgiHttpAdapter(other.url))
        mock = MockAdapter(text="one two three four", pace_s=0.001)
        streams = StreamSet()
        direct = [adapter.submit(make_task(max_tokens=6)) for _ in range(3)]
        hosted = [host.submit("pool", make_task(max_tokens=5)) for _ in range(3)]
        mocked = [mock.submit(make_task(max_tokens=4)) for _ in range(3)]
        for stream in direct + hosted + mocked:
            streams.add(stream)
        got = gather(streams)
    assert len(got) == 9
    for events in got.values():
        check_invariants(events)
        assert events[-1].kind == "end"
    assert all(s.replica_id == "r1" and s.tried == ["r1"] for s in hosted)
    assert [got[s.task_id][-1].data["tokens_out"] for s in direct + hosted + mocked] == [6] * 3 + [5] * 3 + [4] * 3


def test_poll_waits_at_most_its_timeout_and_an_empty_set_returns_at_once(
    server: FakeTgiServer, make_task: MakeTask
) -> None:
    assert StreamSet().poll() == [] and StreamSet().poll(5.0) == []
    server.inject(Fault("stall", at_token=1))
    with TgiHttpAdapter(server.url) as adapter, StreamSet() as streams:
        stream = adapter.submit(make_task(max_tokens=5, deadline_ms=30_000))
        streams.add(stream)
        seen: List[str] = []
        while len(seen) < 2:
            seen += [e.kind for _, e in streams.poll(5.0)]
        assert seen == ["started", "token"]
        t0 = time.monotonic()
        assert streams.poll(0.2) == []  # the engine is silent: nothing, after about the timeout
        assert 0.15 <= time.monotonic() - t0 < 3.0
        assert streams.poll(0) == []
        assert len(streams) == 1


def test_cancel_all_ends_every_open_stream_through_the_set(server: FakeTgiServer, make_task: MakeTask) -> None:
    server.inject(Fault("stall", at_token=2, times=4))
    with TgiHttpAdapter(server.url) as adapter:
        streams = StreamSet(adapter.submit(make_task(max_tokens=50, deadline_ms=30_000)) for _ in range(4))
        started = 0
        while started < 4:
            started += sum(e.kind == "started" for _, e in streams.poll(5.0))
        streams.cancel_all()
        got = gather(streams)
        assert server.wait_for_disconnect(timeout=5.0, count=4)
    assert len(got) == 4
    for events in got.values():
        assert events[-1].kind == "end" and events[-1].data["finish_reason"] == "cancelled"


def test_a_stream_in_a_set_is_not_iterated_directly(server: FakeTgiServer, make_task: MakeTask) -> None:
    with TgiHttpAdapter(server.url) as adapter:
        stream = adapter.submit(make_task(max_tokens=6))
        first = next(stream)  # taken directly before the stream joins the set
        assert first.kind == "started"
        streams = StreamSet([stream])
        with pytest.raises(ValueError, match="StreamSet"):
            next(stream)
        with pytest.raises(ValueError):
            StreamSet([stream])  # one set at a time
        with pytest.raises(TypeError):
            streams.add(iter([]))  # type: ignore[arg-type]
        rest = [e for _, e in streams]
    check_invariants([first] + rest)  # nothing lost, nothing twice
    assert [e.kind for e in rest].count("token") == 6


def test_leaving_the_with_block_closes_what_is_open(server: FakeTgiServer, make_task: MakeTask) -> None:
    server.inject(Fault("stall", at_token=1, times=2))
    with TgiHttpAdapter(server.url) as adapter:
        streams = [adapter.submit(make_task(max_tokens=20, deadline_ms=30_000)) for _ in range(2)]
        with StreamSet(streams) as group:
            started = 0
            while started < 2:  # both requests reached the engine
                started += sum(1 for _, e in group.poll(5.0) if e.kind == "started")
        assert all(s.cancelled for s in streams) and adapter.in_flight == 0
        assert server.wait_for_disconnect(timeout=5.0, count=2)


def test_one_stalled_consumer_set_does_not_hold_up_another(server: FakeTgiServer, make_task: MakeTask) -> None:
    # Two dispatch loops on two threads; one stops taking events for a while.
    with TgiHttpAdapter(server.url) as adapter:
        slow = StreamSet(adapter.submit(make_task(max_tokens=40)) for _ in range(3))
        fast = StreamSet(adapter.submit(make_task(max_tokens=40)) for _ in range(3))
        finished = threading.Event()
        results: Dict[str, List[TokenEvent]] = {}

        def run_fast() -> None:
            results.update(gather(fast))
            finished.set()

        worker = threading.Thread(target=run_fast)
        worker.start()
        assert finished.wait(10.0)  # while ``slow`` has not been polled at all
        worker.join()
        late = gather(slow)  # its events waited in their queues, complete and in order
    for events in list(results.values()) + list(late.values()):
        check_invariants(events)
        assert [e.kind for e in events].count("token") == 40


def test_a_reader_gone_silent_ends_the_stream_after_its_deadline() -> None:
    # A channel nobody feeds stands for a reader that died.
    channel = StreamChannel("lost")
    started = {"engine": "tgi", "engine_version": None, "task_id": "lost"}
    stream = TokenStream("lost", channel, started_data=started, deadline=time.monotonic() - 1.9)
    with StreamSet([stream]) as streams:
        t0 = time.monotonic()
        events = [e for _, e in streams]
    assert [e.kind for e in events] == ["error"] and events[0].data["code"] == "DEADLINE_UNMET"
    assert time.monotonic() - t0 < 3.0


def test_streams_of_a_closed_adapter_end_cancelled(server: FakeTgiServer, make_task: MakeTask) -> None:
    server.inject(Fault("stall", at_token=1, times=3))
    adapter = TgiHttpAdapter(server.url, config=AdapterConfig())
    streams = StreamSet(adapter.submit(make_task(max_tokens=9, deadline_ms=30_000)) for _ in range(3))
    assert sum(e.kind == "started" for _, e in streams.poll(5.0)) >= 1
    adapter.close()
    got = gather(streams)
    assert all(events[-1].data.get("finish_reason") == "cancelled" for events in got.values())
