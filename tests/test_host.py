"""AdapterHost: many replicas behind one facade (routing, failover, breaker, registry, correlation)."""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from tgi_adapter import (
    AdapterConfig,
    AdapterHost,
    ErrorKind,
    PoolUnavailableError,
    RetryPolicy,
    TaskRequest,
    TgiHttpAdapter,
    TokenStream,
    WorkerError,
    WorkerHealth,
)
from tgi_adapter.breaker import BreakerState, CircuitBreaker, Outcome, choose_replica
from tgi_adapter.contract import TaskLike
from tgi_adapter.host import HostStream, UnknownReplicaError
from tgi_adapter.testing import FakeTgiServer, Fault, MockAdapter, MockFault

from test_streaming import check_invariants

MakeTask = Callable[..., TaskRequest]

# The adapters try once, so the host's failover is what the tests see.
ONCE = AdapterConfig(retry=RetryPolicy(attempts=1))


class Clock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Engine(TgiHttpAdapter):
    """A TgiHttpAdapter that records when the host closes it."""

    def __init__(self, url: str) -> None:
        super().__init__(url, config=ONCE)
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        super().close()


class Mock(MockAdapter):
    """A MockAdapter that signals each submit, may tick a clock in it, and records its closing."""

    def __init__(self, *, tick: Optional[Tuple[Clock, float]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tick = tick
        self.got_task = threading.Event()
        self.closed = threading.Event()

    def submit(self, task: TaskLike, correlation_id: Optional[str] = None) -> TokenStream:
        if self.tick is not None:
            self.tick[0].now += self.tick[1]
        try:
            return super().submit(task, correlation_id)
        finally:
            self.got_task.set()

    def close(self) -> None:
        self.closed.set()
        super().close()


def kinds(events: List[Any]) -> List[str]:
    return [e.kind for e in events]


def generations(server: FakeTgiServer) -> List[Any]:
    return [r for r in server.requests if r.path == "/generate_stream"]


@pytest.fixture(name="servers")
def _servers() -> Iterator[List[FakeTgiServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeTgiServer(max_concurrent_requests=4)) for _ in range(3)]


# -- the pure parts ---------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_then_one_trial_decides() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=30.0)
    assert breaker.state(0) is BreakerState.CLOSED and breaker.acquire(0) is False
    breaker.record(Outcome.FAILURE, 1, trial=False)
    breaker.record(Outcome.FAILURE, 2, trial=False)
    breaker.record(Outcome.SUCCESS, 3, trial=False)  # not consecutive any more
    assert breaker.failures == 0
    breaker.record(Outcome.NEUTRAL, 4, trial=False)
    breaker.record(Outcome.FAILURE, 5, trial=False)
    breaker.record(Outcome.FAILURE, 6, trial=False)
    assert breaker.record(Outcome.FAILURE, 10, trial=False) == (BreakerState.CLOSED, BreakerState.OPEN)
    assert breaker.state(39.9) is BreakerState.OPEN and breaker.acquire(39.9) is None
    assert breaker.retry_in(25) == pytest.approx(15.0)
    assert breaker.record(Outcome.SUCCESS, 20, trial=False) is None  # a late result does not close it
    assert breaker.state(40) is BreakerState.HALF_OPEN and breaker.retry_in(40) is None
    assert breaker.acquire(40) is True and breaker.acquire(40) is None  # one trial at a time
    assert not breaker.admits(41)
    breaker.record(Outcome.NEUTRAL, 41, trial=True)  # a cancelled trial frees the slot
    assert breaker.acquire(42) is True
    assert breaker.record(Outcome.FAILURE, 43, trial=True) == (BreakerState.HALF_OPEN, BreakerState.OPEN)
    assert breaker.state(72.9) is BreakerState.OPEN and breaker.acquire(73) is True
    assert breaker.record(Outcome.SUCCESS, 74, trial=True) == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
    assert breaker.failures == 0 and breaker.acquire(74) is False


@pytest.mark.parametrize(("threshold", "cooldown"), [(0, 1.0), (True, 1.0), (1, -1.0), (1, float("nan"))])
def test_bad_breaker_settings_are_refused(threshold: Any, cooldown: Any) -> None:
    with pytest.raises(ValueError):
        AdapterHost(failure_threshold=threshold, cooldown_s=cooldown)


def test_choice_is_most_free_slots_then_round_robin() -> None:
    assert choose_replica([(1, 2), (2, 5), (3, 1)], last=None) == 1
    tied = [(1, 4), (2, 4), (3, 4)]
    picks = []
    last = None
    for _ in range(5):
        index = choose_replica(tied, last)
        last = tied[index][0]
        picks.append(last)
    assert picks == [1, 2, 3, 1, 2]
    assert choose_replica([(5, 3), (2, 3), (9, 1)], last=2) == 0  # the next tied position after 2
    with pytest.raises(ValueError):
        choose_replica([], None)


# -- routing ----------------------------------------------------------------------------


def test_routes_by_free_slots_and_spreads_a_burst(servers: List[FakeTgiServer], make_task: MakeTask) -> None:
    # Load from elsewhere, seen only through each engine's /metrics: a 3 busy, b 1, c none.
    clock = Clock()  # frozen: one health/props snapshot for the whole burst
    with ExitStack() as stack:
        direct = [stack.enter_context(TgiHttpAdapter(s.url)) for s in servers]
        preload = []
        for server, adapter, busy in zip(servers, direct, (3, 1, 0)):
            server.inject(Fault("stall", at_token=1, times=busy + 10))
            for _ in range(busy):
                stream = stack.enter_context(adapter.submit(make_task()))
                assert kinds([next(stream), next(stream)]) == ["started", "token"]
                preload.append(stream)
        host = stack.enter_context(AdapterHost(props_ttl_s=5.0, clock=clock))
        for name, server in zip("abc", servers):
            host.bind("p", name, Engine(server.url))
        burst = [stack.enter_context(host.submit("p", make_task())) for _ in range(6)]
        for stream in burst:
            assert next(stream).kind == "started"
        placed = [s.replica_id for s in burst]
        assert placed[0] == "c"  # 4 free beats 3 and 1
        counts = {name: placed.count(name) for name in "abc"}
        assert counts["a"] <= 1 and 2 <= counts["b"] <= 3 and 3 <= counts["c"] <= 4, placed
        free = [status.slots_free for status in host.replicas("p")]
        assert max(free) - min(free) <= 1 and sum(free) == 8 - 6  # type: ignore[arg-type,operator]
        assert [len(generations(s)) - busy for s, busy in zip(servers, (3, 1, 0))] == [counts[n] for n in "abc"]


def test_ties_are_broken_round_robin(make_task: MakeTask) -> None:
    mocks = [Mock(slots_total=4) for _ in range(3)]
    with AdapterHost(clock=Clock()) as host:
        for name, mock in zip("abc", mocks):
            host.bind("p", name, mock)
        placed = []
        for _ in range(7):
            stream = host.submit("p", make_task(max_tokens=2))
            check_invariants(list(stream))
            placed.append(stream.replica_id)
    assert placed == ["a", "b", "c", "a", "b", "c", "a"]


def test_health_and_props_are_refreshed_once_per_ttl_however_many_submit(make_task: MakeTask) -> None:
    with FakeTgiServer(faults=[Fault("stall", at_token=1, times=40)]) as server, AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Engine(server.url))
        start = threading.Barrier(40)

        def first_event(_: int) -> str:
            stream = host.submit("p", make_task())
            start.wait()
            try:
                return next(stream).kind
            finally:
                stream.close()

        with ThreadPoolExecutor(40) as pool:
            firsts = list(pool.map(first_event, range(40)))
    assert firsts == ["started"] * 40
    control = [r.path for r in server.requests if r.method == "GET"]
    assert control.count("/health") == 1 and control.count("/metrics") == 1


# -- failover ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=503),
        Fault("status", status=429),
        Fault("disconnect_before_headers"),
        Fault("error_frame", at_token=0, error_type="overloaded"),
    ],
    ids=["503", "429", "disconnect", "overloaded-frame"],
)
def test_a_retriable_failure_before_the_first_token_fails_over(
    servers: List[FakeTgiServer], fault: Fault, make_task: MakeTask
) -> None:
    first, second, _ = servers
    first.inject(fault)
    with AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Engine(first.url))
        host.bind("p", "b", Engine(second.url))
        stream = host.submit("p", make_task(max_tokens=5), correlation_id="corr-1")
        events = list(stream)
        status = host.replicas("p")
    check_invariants(events)
    assert kinds(events)[-1] == "end" and stream.tried == ["a", "b"] and stream.replica_id == "b"
    assert events[0].data["correlation_id"] == "corr-1"
    sent = generations(first) + generations(second)
    assert [r.headers["x-correlation-id"] for r in sent] == ["corr-1", "corr-1"]
    assert status[0].failures == 1 and status[1].failures == 0


def test_no_failover_after_a_token(servers: List[FakeTgiServer], make_task: MakeTask) -> None:
    first, second, _ = servers
    first.inject(Fault("reset", at_token=2))
    with AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Engine(first.url))
        host.bind("p", "b", Engine(second.url))
        stream = host.submit("p", make_task(max_tokens=8))
        events = list(stream)
    check_invariants(events)
    assert kinds(events) == ["started", "token", "token", "error"]
    assert events[-1].data["code"] == "WORKER_RESET" and events[-1].data["retriable"] is True
    assert stream.tried == ["a"] and generations(second) == []


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault("status", status=424), "POOL_UNAVAILABLE"),  # the engine's CUDA out-of-memory answer
        (Fault("error_frame", at_token=0, error_type="validation"), "INVALID_PARAMS"),
    ],
    ids=["oom", "validation"],
)
def test_a_non_retriable_error_is_passed_through_without_failover(
    servers: List[FakeTgiServer], fault: Fault, code: str, make_task: MakeTask
) -> None:
    first, second, _ = servers
    first.inject(fault)
    with AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Engine(first.url))
        host.bind("p", "b", Engine(second.url))
        events = list(host.submit("p", make_task()))
        assert host.replicas("p")[0].failures == 0  # the task's fault, not the replica's
    assert kinds(events) == ["error"] and events[0].data["code"] == code
    assert generations(second) == []


def test_one_replica_failing_gives_its_own_error_and_all_failing_gives_replica_exhausted(
    make_task: MakeTask,
) -> None:
    reject = MockFault("error", code="ADMISSION_REJECT", retry_after_ms=700, times=5)
    with AdapterHost() as host:
        host.bind("solo", "a", Mock(faults=(reject,)))
        [alone] = list(host.submit("solo", make_task()))
        assert alone.data["code"] == "ADMISSION_REJECT" and alone.data["retry_after_ms"] == 700
        host.bind("p", "b", Mock(faults=(reject,)))
        host.bind("p", "c", Mock(faults=(MockFault("raise", code="POOL_UNREADY"),)))
        stream = host.submit("p", make_task())
        events = list(stream)
    assert kinds(events) == ["error"] and sorted(stream.tried) == ["b", "c"]
    data = events[0].data
    assert data["code"] == "REPLICA_EXHAUSTED" and data["retriable"] is True and data["retry_after_ms"] == 700
    assert "b: ADMISSION_REJECT" in data["message"] and "c: POOL_UNREADY" in data["message"]


def test_a_retriable_submit_error_fails_over_and_counts_against_the_replica(make_task: MakeTask) -> None:
    with AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Mock(slots_total=8, faults=(MockFault("raise", code="POOL_UNAVAILABLE"),)))
        host.bind("p", "b", Mock())
        stream = host.submit("p", make_task())
        assert kinds(list(stream))[-1] == "end" and stream.tried == ["a", "b"]
        assert [s.failures for s in host.replicas("p")] == [1, 0]


def test_failover_stays_within_the_task_deadline(make_task: MakeTask) -> None:
    clock = Clock()
    reset = MockFault("error", code="WORKER_RESET", times=2)
    slow = Mock(slots_total=8, tick=(clock, 4.0), faults=(reset,))
    spare = Mock()
    with AdapterHost(clock=clock) as host:
        host.bind("p", "slow", slow)
        host.bind("p", "spare", spare)
        assert kinds(list(host.submit("p", make_task(deadline_ms=10_000))))[-1] == "end"
        assert spare.submitted[-1].deadline_ms == 6_000  # what was left after 4 s on the first replica
        slow.tick = (clock, 11.0)
        stream = host.submit("p", make_task(deadline_ms=10_000))
        events = list(stream)
    assert kinds(events) == ["error"] and events[0].data["code"] == "DEADLINE_UNMET"
    assert "WORKER_RESET" in events[0].data["message"]
    assert stream.tried == ["slow"] and len(spare.submitted) == 1


# -- the breaker ------------------------------------------------------------------------


def test_the_breaker_opens_half_opens_and_closes_on_the_injected_clock(make_task: MakeTask) -> None:
    clock = Clock()
    reset = MockFault("error", code="WORKER_RESET", at_token=0)
    flaky = Mock(slots_total=8, faults=(MockFault("error", code="WORKER_RESET", times=2),))  # preferred: more slots
    spare = Mock()
    with AdapterHost(failure_threshold=2, cooldown_s=30.0, clock=clock) as host:
        host.bind("p", "flaky", flaky)
        host.bind("p", "spare", spare)

        def run() -> HostStream:
            stream = host.submit("p", make_task())
            events = list(stream)
            check_invariants(events)
            assert kinds(events)[-1] == "end"
            return stream

        def breaker() -> BreakerState:
            return host.replicas("p")[0].breaker

        assert [run().tried for _ in range(2)] == [["flaky", "spare"]] * 2
        assert breaker() is BreakerState.OPEN
        assert run().tried == ["spare"] and len(flaky.submitted) == 2  # kept out while cooling

        clock.now += 30.0
        assert breaker() is BreakerState.HALF_OPEN
        flaky.inject(reset)
        assert run().tried == ["flaky", "spare"]  # the trial failed: open again
        clock.now += 29.9
        assert breaker() is BreakerState.OPEN and run().tried == ["spare"]

        clock.now += 0.1
        flaky.inject(MockFault("stall", at_token=0))
        flaky.got_task.clear()
        trial = host.submit("p", make_task(deadline_ms=60_000))
        firsts: List[str] = []
        consumer = threading.Thread(target=lambda: firsts.append(next(trial).kind))
        consumer.start()
        assert flaky.got_task.wait(5.0)
        assert run().tried == ["spare"]  # half-open lets only one trial through
        trial.cancel()
        consumer.join(5.0)
        assert firsts == ["started"] and kinds(list(trial)) == ["end"]
        assert breaker() is BreakerState.HALF_OPEN  # a cancelled trial says nothing

        assert run().tried == ["flaky"]  # the next trial succeeds
        assert breaker() is BreakerState.CLOSED and host.replicas("p")[0].failures == 0
        assert run().tried == ["flaky"]


# -- no ready replica ----------------------------------------------------------------------


def test_no_ready_replica_is_pool_unready_or_unavailable_with_the_reason(make_task: MakeTask) -> None:
    clock = Clock()
    a, b = Mock(ready=False), Mock(live=False)
    with AdapterHost(failure_threshold=1, cooldown_s=30.0, props_ttl_s=0.0, clock=clock) as host:
        host.bind("p", "a", a)
        host.bind("p", "b", b)
        [event] = list(host.submit("p", make_task()))
        assert event.data["code"] == "POOL_UNREADY" and event.data["retriable"] is True
        assert "a: not ready" in event.data["message"] and "b: not live" in event.data["message"]
        assert host.health("p") == WorkerHealth(live=True, ready=False)

        a.live = False
        [event] = list(host.submit("p", make_task()))
        assert event.data["code"] == "POOL_UNAVAILABLE" and event.data["retriable"] is True
        assert host.health("p") == WorkerHealth(live=False, ready=False)

        a.live = a.ready = True
        a.inject(MockFault("error", code="DECODE_TIMEOUT"))
        list(host.submit("p", make_task()))  # opens a's breaker
        clock.now += 10.0
        [event] = list(host.submit("p", make_task()))
        assert event.data["code"] == "POOL_UNREADY" and event.data["retry_after_ms"] == 20_000
        assert "breaker open" in event.data["message"]
        assert host.health("p") == WorkerHealth(live=True, ready=False)
        assert a.submitted and not b.submitted


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_goes_to_the_replica_that_holds_the_task(servers: List[FakeTgiServer], make_task: MakeTask) -> None:
    for server in servers:
        server.inject(Fault("stall", at_token=1, times=5))
    with AdapterHost(clock=Clock()) as host:
        for name, server in zip("abc", servers):
            host.bind("p", name, Engine(server.url))
        streams = [host.submit("p", make_task(deadline_ms=60_000)) for _ in range(3)]
        for stream in streams:
            assert kinds([next(stream), next(stream)]) == ["started", "token"]
        target = streams[1]
        holder = servers["abc".index(target.replica_id or "")]
        host.cancel("p", target.task_id)
        assert kinds(list(target)) == ["end"] and target.cancelled
        assert holder.wait_for_disconnect(timeout=5.0)
        assert sum(len(s.disconnects) for s in servers) == 1  # nobody else was touched
        host.cancel("p", target.task_id)  # idempotent
        host.cancel("p", "no-such-task")
        host.cancel("no-such-pool", "x")
        for stream in streams:
            stream.close()


def test_cancel_before_the_first_event_or_while_routing(make_task: MakeTask) -> None:
    with AdapterHost() as host:
        idle = Mock()
        host.bind("p", "a", idle)
        early = host.submit("p", make_task(), correlation_id="c-early")
        host.cancel("p", early.task_id)
        events = list(early)
        assert kinds(events) == ["started", "end"] and events[-1].data["finish_reason"] == "cancelled"
        assert events[0].data["correlation_id"] == "c-early" and idle.submitted == []

        class CancelsInSubmit(Mock):
            def submit(self, task: TaskLike, correlation_id: Optional[str] = None) -> TokenStream:
                host.cancel("q", as_id(task))
                return super().submit(task, correlation_id)

        host.bind("q", "a", CancelsInSubmit(slots_total=8, faults=(MockFault("stall"),)))
        other = Mock()
        host.bind("q", "b", other)
        stream = host.submit("q", make_task(deadline_ms=60_000))
        events = list(stream)
        assert kinds(events) == ["started", "end"] and events[-1].data["finish_reason"] == "cancelled"
        assert other.submitted == []


def as_id(task: TaskLike) -> str:
    return task.task_id if isinstance(task, TaskRequest) else str(task["task_id"])


# -- the stream object ----------------------------------------------------------------------


def test_a_host_stream_behaves_like_a_token_stream(make_task: MakeTask) -> None:
    mock = Mock(text="one two three")
    with AdapterHost() as host:
        host.bind("p", "a", mock)
        stream = host.submit("p", make_task(max_tokens=3, seed=5))
        assert isinstance(stream, TokenStream) and stream.task_id.startswith("t-")
        assert not stream.finished and "pool='p'" in repr(stream)
        assert stream.collect()[0] == "one two three"
        assert stream.finished and list(stream) == [] and stream.join(1.0)

        with host.submit("p", make_task()) as closed_early:
            pass
        # Closing never swallows the terminal event: a later iteration still gets the cancelled tail.
        assert closed_early.cancelled and not closed_early.finished
        tail = list(closed_early)
        assert kinds(tail) == ["started", "end"] and tail[-1].data["finish_reason"] == "cancelled"
        assert closed_early.finished and list(closed_early) == []

        with host.submit("p", make_task(deadline_ms=60_000)) as stream:
            mock.inject(MockFault("stall", at_token=1))
            assert kinds([next(stream), next(stream)]) == ["started", "token"]
        assert stream.cancelled and mock.props().in_flight == 0
        assert [e.data["finish_reason"] for e in stream] == ["cancelled"] and stream.finished

        failing = host.submit("p", make_task())
        mock.inject(MockFault("error", code="INTERNAL"))
        with pytest.raises(WorkerError) as info:
            failing.collect()
        assert info.value.code is ErrorKind.INTERNAL
        assert len(mock.submitted) == 3  # closed_early never reached the replica


# -- correlation and labels ------------------------------------------------------------------


def test_the_correlation_id_reaches_the_engine_the_started_event_and_every_log_record(
    servers: List[FakeTgiServer], make_task: MakeTask, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, _ = servers
    first.inject(Fault("status", status=503))
    with AdapterHost(clock=Clock()) as host:
        host.bind("p", "a", Engine(first.url))
        host.bind("p", "b", Engine(second.url))
        caplog.set_level(logging.DEBUG, logger="tgi_adapter")
        stream = host.submit("p", make_task())
        events = list(stream)
        generated = list(host.submit("p", make_task()))
    cid = stream.correlation_id
    assert uuid.UUID(cid).version == 4 and events[0].data["correlation_id"] == cid
    assert generated[0].data["correlation_id"] not in (None, cid)
    sent = [r.headers["x-correlation-id"] for r in generations(first) + generations(second)]
    assert sent.count(cid) == 2 and len(sent) == 3
    mine = stream.task_id
    host_loggers = ("tgi_adapter.host", "tgi_adapter.host_stream")
    records = [r for r in caplog.records if r.name in host_loggers and r.__dict__.get("task_id") == mine]
    assert len(records) >= 4  # submitted, routed, failed over, routed
    for record in records:
        assert record.__dict__["correlation_id"] == cid and cid in record.getMessage()
    assert any("failing over" in r.getMessage() for r in records)


def test_pool_and_replica_labels_flow_into_each_adapters_metrics(
    servers: List[FakeTgiServer], make_task: MakeTask
) -> None:
    first, second, _ = servers
    with AdapterHost() as host:
        engine = Engine(first.url)
        host.bind("pool-x", "gpu-0", engine)
        assert engine.labels["pool_id"] == "pool-x" and engine.labels["replica_id"] == "gpu-0"
        list(host.submit("pool-x", make_task()))
        started = engine.metrics.snapshot()["tasks_started_total"]
        assert [s["labels"]["pool_id"] for s in started] == ["pool-x"]
        assert [s["labels"]["replica_id"] for s in started] == ["gpu-0"]
        replacement = Engine(second.url)
        host.rebind("pool-x", "gpu-0", replacement)
        assert replacement.labels["replica_id"] == "gpu-0"
        mock = MockAdapter()  # no set_placement: still accepted
        host.bind("pool-x", "cpu", mock)


# -- registry ------------------------------------------------------------------------------


def test_rebind_lets_streams_on_the_old_adapter_finish_then_closes_it(
    servers: List[FakeTgiServer], make_task: MakeTask
) -> None:
    first, second, _ = servers
    with AdapterHost() as host:
        old, new = Engine(first.url), Engine(second.url)
        host.bind("p", "r", old)
        draining = host.submit("p", make_task(max_tokens=6))
        assert kinds([next(draining), next(draining)]) == ["started", "token"]
        host.rebind("p", "r", new)
        assert not old.closed.is_set()
        after = list(host.submit("p", make_task()))
        rest = list(draining)
        assert kinds(rest)[-1] == "end" and rest[-1].data["tokens_out"] == 6
        assert old.closed.is_set() and not new.closed.is_set()
        assert kinds(after)[-1] == "end" and len(generations(second)) == 1 and len(generations(first)) == 1
        idle = Engine(first.url)
        host.rebind("p", "r", idle)
        assert new.closed.is_set()  # nothing in flight: closed at once
    assert idle.closed.is_set()


def test_registry_errors_are_clear(make_task: MakeTask) -> None:
    with AdapterHost() as host:
        mock = Mock()
        host.bind("p", "a", mock)
        with pytest.raises(ValueError, match="rebind"):
            host.bind("p", "a", Mock())
        with pytest.raises(ValueError, match="already bound"):
            host.bind("p", "b", mock)
        with pytest.raises(ValueError):
            host.bind("p", "", Mock())
        with pytest.raises(ValueError):
            host.bind("p", "c", object())  # type: ignore[arg-type]
        with pytest.raises(UnknownReplicaError, match="'zz'"):
            host.rebind("p", "zz", Mock())
        with pytest.raises(KeyError):
            host.unbind("nope", "a")
        with pytest.raises(PoolUnavailableError) as info:
            host.submit("nope", make_task())
        assert not info.value.retriable
        with pytest.raises(WorkerError) as bad:
            host.submit("p", make_task(), correlation_id="")
        assert bad.value.code is ErrorKind.INVALID_PARAMS
        stream = host.submit("p", make_task(task_id="same"))
        with pytest.raises(WorkerError, match="already in flight"):
            host.submit("p", make_task(task_id="same"))
        stream.close()
        host.submit("p", make_task(task_id="same")).close()  # free again once finished
        host.unbind("p", "a")
        assert mock.closed.is_set()
        with pytest.raises(PoolUnavailableError):
            host.submit("p", make_task())
        assert host.health("p") == WorkerHealth(live=False, ready=False)
        with pytest.raises(PoolUnavailableError):
            host.props("p")
    with pytest.raises(PoolUnavailableError):
        host.submit("p", make_task())
    with pytest.raises(ValueError):
        host.bind("p", "a", Mock())


def test_health_and_props_aggregate_the_replicas(servers: List[FakeTgiServer]) -> None:
    servers[1].healthy = False
    with AdapterHost() as host:
        for name, server in zip("abc", servers):
            host.bind("p", name, Engine(server.url))
        host.bind("p", "m", MockAdapter(slots_total=2, live=False))
        assert host.health("p") == WorkerHealth(live=True, ready=True)
        props = host.props("p")
        assert props.slots_total == 3 * 4 + 2 and props.slots_free == 3 * 4 + 2 and props.in_flight == 0
        assert props.max_total_tokens == 4096 and props.model_id is None  # two models in the pool
        servers[0].healthy = servers[2].healthy = False
        assert host.health("p") == WorkerHealth(live=True, ready=False)


def test_close_cancels_what_is_in_flight_and_closes_every_adapter(
    servers: List[FakeTgiServer], make_task: MakeTask
) -> None:
    server = servers[0]
    server.inject(Fault("stall", at_token=1))
    host = AdapterHost()
    engine, mock = Engine(server.url), Mock(ready=False)
    host.bind("p", "a", engine)
    host.bind("p", "m", mock)
    stream = host.submit("p", make_task(deadline_ms=60_000))
    assert kinds([next(stream), next(stream)]) == ["started", "token"]
    host.close()
    assert kinds(list(stream)) == ["end"] and stream.cancelled
    assert engine.closed.is_set() and mock.closed.is_set()
    assert server.wait_for_disconnect(timeout=5.0)
    host.close()  # idempotent


def test_100_concurrent_submits_under_bind_rebind_lose_and_duplicate_nothing(make_task: MakeTask) -> None:
    with ExitStack() as stack:
        servers = [stack.enter_context(FakeTgiServer()) for _ in range(3)]
        run_the_storm(servers, make_task)


def run_the_storm(servers: List[FakeTgiServer], make_task: MakeTask) -> None:
    engines: List[Engine] = []

    def engine(n: int) -> Engine:
        made = Engine(servers[n % len(servers)].url)
        engines.append(made)
        return made

    tasks = [make_task(max_tokens=4) for _ in range(100)]
    results: Dict[str, Tuple[str, Dict[str, Any]]] = {}
    with AdapterHost(props_ttl_s=0.01) as host:
        host.bind("p", "r0", engine(0))
        host.bind("p", "r1", engine(1))
        host.bind("p", "r2", engine(2))
        go = threading.Barrier(101)

        def run(task: TaskRequest) -> None:
            go.wait()
            results[task.task_id] = host.submit("p", task, correlation_id=task.task_id).collect()

        with ThreadPoolExecutor(100) as pool:
            futures = [pool.submit(run, task) for task in tasks]
            go.wait()
            for n in range(30):
                host.rebind("p", "r1", engine(n))
                host.bind("p", "r3", engine(n + 1))
                host.unbind("p", "r3")
            for future in futures:
                future.result(timeout=30)
    assert sorted(results) == sorted(t.task_id for t in tasks)
    assert all(end["finish_reason"] == "length" and end["tokens_out"] == 4 for _, end in results.values())
    reached = [r.headers["x-correlation-id"] for s in servers for r in generations(s)]
    assert sorted(reached) == sorted(t.task_id for t in tasks)  # each task reached one engine, once
    assert len(engines) == 63 and all(e.closed.is_set() for e in engines)
