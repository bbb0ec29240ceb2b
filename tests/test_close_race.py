"""close() from another thread, at every moment of a stream's life, over plain HTTP and TLS.

Each stream is consumed by one thread while another closes it: before the
response headers, as soon as it is submitted, after a few events, or after
the engine finished. Whatever the interleaving, every stream hands out
exactly one terminal event, last; no token comes from a ``next()`` that began
after ``close()`` returned, and such a ``next()`` ends the stream with
``end`` "cancelled". No thread, socket or in-flight task is left behind.
"""

from __future__ import annotations

import gc
import os
import random
import ssl
import threading
from typing import Callable, List, Optional, Tuple

import pytest

from tgi_adapter import AdapterConfig, TaskRequest, TgiHttpAdapter, TokenEvent, runtime
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]

STREAMS = 1000
WORKERS = 16
MOMENTS = ("before_headers", "at_submit", "after_events", "after_engine_finished")


def open_fds() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: the other checks still run
        return None


class Outcome:
    def __init__(self, moment: str) -> None:
        self.moment = moment
        self.events: List[TokenEvent] = []
        self.problems: List[str] = []


def consume_while_closing(stream_factory: Callable[[str], object], moment: str, target: int,
                          outcome: Outcome) -> None:
    """Run one stream: this thread iterates, a second thread closes it at ``moment``."""
    stream = stream_factory(moment)
    seen = threading.Semaphore(0)
    closed = threading.Event()
    iterate = threading.Event()

    def closer() -> None:
        if moment == "after_events":
            for _ in range(target):
                seen.acquire()
        elif moment == "after_engine_finished":
            assert stream.join(timeout=10.0)  # type: ignore[attr-defined]
        stream.close()  # type: ignore[attr-defined]
        closed.set()
        iterate.set()

    closing = threading.Thread(target=closer, name="closer")
    closing.start()
    if moment == "after_engine_finished":
        iterate.wait(timeout=15.0)
    try:
        while True:
            after_close = closed.is_set()
            try:
                event = next(stream)  # type: ignore[call-overload]
            except StopIteration:
                break
            outcome.events.append(event)
            seen.release()
            if after_close and event.kind == "token":
                outcome.problems.append("a token after close() returned")
            if after_close and event.kind in ("end", "error") and event.data.get("finish_reason") != "cancelled":
                outcome.problems.append(f"a natural {event.kind} after close() returned")
    finally:
        for _ in range(target):  # a stream shorter than the target must not leave the closer waiting
            seen.release()
        closing.join(timeout=15.0)
    if list(stream) != []:  # type: ignore[call-overload]
        outcome.problems.append("events after the terminal one")


def check_contract(outcome: Outcome) -> List[str]:
    kinds = [e.kind for e in outcome.events]
    problems = list(outcome.problems)
    terminals = [k for k in kinds if k in ("end", "error")]
    if len(terminals) != 1 or kinds[-1] not in ("end", "error"):
        problems.append(f"{len(terminals)} terminal events: {kinds}")
    if kinds and kinds[0] != "started" and kinds != ["error"]:
        problems.append(f"does not begin with started: {kinds}")
    if kinds.count("started") > 1:
        problems.append("started twice")
    tokens = [e.data["i"] for e in outcome.events if e.kind == "token"]
    if tokens != list(range(len(tokens))):
        problems.append(f"token indices {tokens}")
    return [f"{outcome.moment}: {p}" for p in problems]


def run_race(paced: FakeTgiServer, slow: FakeTgiServer, config: AdapterConfig, make_task: MakeTask) -> None:
    rng = random.Random(20261203)
    plan: List[Tuple[str, int, int]] = [
        (rng.choice(MOMENTS), rng.randint(1, 12), rng.randint(0, 14)) for _ in range(STREAMS)
    ]
    outcomes: List[Outcome] = []
    with TgiHttpAdapter(paced.url, config=config) as fast_adapter, \
            TgiHttpAdapter(slow.url, config=config) as slow_adapter:
        lock = threading.Lock()
        work = iter(plan)

        def worker() -> None:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                moment, max_tokens, target = item
                outcome = Outcome(moment)
                with lock:
                    outcomes.append(outcome)

                def factory(moment: str, max_tokens: int = max_tokens) -> object:
                    adapter = slow_adapter if moment == "before_headers" else fast_adapter
                    return adapter.submit(make_task(max_tokens=max_tokens, deadline_ms=30_000))

                consume_while_closing(factory, moment, target, outcome)

        threads = [threading.Thread(target=worker, name=f"worker-{n}") for n in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120.0)
        assert not any(t.is_alive() for t in threads), "a consumer hung"
        assert fast_adapter.in_flight == 0 and slow_adapter.in_flight == 0
    problems = [p for outcome in outcomes for p in check_contract(outcome)]
    assert len(outcomes) == STREAMS
    assert not problems, f"{len(problems)} contract breaks, e.g. {problems[:5]}"
    assert {o.moment for o in outcomes} == set(MOMENTS)
    cancelled = sum(1 for o in outcomes if o.events[-1].data.get("finish_reason") == "cancelled")
    assert cancelled > STREAMS // 2  # most closes land before the natural end


def check_no_socket_left(fds_before: Optional[int]) -> None:
    gc.collect()  # an adapter another test left unclosed keeps the shared threads around until collected
    assert runtime.reactor().wait_stopped(timeout=10.0), "the shared reader did not stop once idle"
    fds_after = open_fds()
    if fds_before is not None and fds_after is not None:
        assert fds_after <= fds_before, "a socket was left open"


@pytest.mark.slow
def test_close_from_another_thread_at_any_moment_over_http(make_task: MakeTask) -> None:
    fds_before = open_fds()
    with FakeTgiServer(pace_s=0.002) as paced, \
            FakeTgiServer(faults=[Fault("slow_headers", delay_s=0.05, times=STREAMS)]) as slow:
        run_race(paced, slow, AdapterConfig(), make_task)
    check_no_socket_left(fds_before)


@pytest.mark.slow
def test_close_from_another_thread_at_any_moment_over_tls(
    tls: Tuple[ssl.SSLContext, str], make_task: MakeTask
) -> None:
    context, ca_file = tls
    fds_before = open_fds()
    with FakeTgiServer(pace_s=0.002, ssl_context=context) as paced, \
            FakeTgiServer(ssl_context=context, faults=[Fault("slow_headers", delay_s=0.05, times=STREAMS)]) as slow:
        run_race(paced, slow, AdapterConfig(verify=ca_file), make_task)
    check_no_socket_left(fds_before)
