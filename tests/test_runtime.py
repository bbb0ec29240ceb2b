"""The shared machinery under every stream: the timer heap, the selector loop, the worker pool."""

from __future__ import annotations

import socket
import threading
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tgi_adapter.reactor import Reactor
from tgi_adapter.timers import TimerHeap
from tgi_adapter.workers import WorkerPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the timer heap (pure) ---------------------------------------------------------------------


def test_timers_come_due_in_order_and_ties_keep_their_order() -> None:
    heap = TimerHeap()
    fired: List[str] = []
    for name, due in (("c", 3.0), ("a", 1.0), ("b1", 2.0), ("b2", 2.0), ("d", 4.0)):
        heap.add(due, lambda name=name: fired.append(name))  # type: ignore[misc]
    assert heap.next_due() == 1.0 and len(heap) == 5
    for callback in heap.pop_due(2.0):
        callback()
    assert fired == ["a", "b1", "b2"]
    assert heap.next_due() == 3.0 and len(heap) == 2
    assert heap.pop_due(2.999) == []


def test_a_cancelled_timer_never_runs_and_does_not_hold_the_next_due_time() -> None:
    heap = TimerHeap()
    first = heap.add(1.0, lambda: None)
    heap.add(5.0, lambda: None)
    first.cancel()
    assert not first.active
    assert heap.next_due() == 5.0 and len(heap) == 1
    assert len(heap.pop_due(10.0)) == 1
    assert heap.next_due() is None and len(heap) == 0


@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.booleans()), max_size=60),
       st.floats(0, 100, allow_nan=False))
def test_pop_due_returns_exactly_the_live_timers_due_in_order(entries: List[tuple], now: float) -> None:  # type: ignore[type-arg]
    heap = TimerHeap()
    ran: List[int] = []
    for n, (due, cancel) in enumerate(entries):
        timer = heap.add(due, lambda n=n: ran.append(n))  # type: ignore[misc]
        if cancel:
            timer.cancel()
    for callback in heap.pop_due(now):
        callback()
    expected = sorted((due, n) for n, (due, cancel) in enumerate(entries) if not cancel and due <= now)
    assert ran == [n for _due, n in expected]
    left = [due for due, cancel in entries if not cancel and due > now]
    assert heap.next_due() == (min(left) if left else None)


# -- the selector loop -------------------------------------------------------------------------


def test_the_loop_runs_work_on_its_own_thread_and_ends_when_idle() -> None:
    loop = Reactor(lambda: 0.01, name="test-reactor")
    seen: List[str] = []
    done = threading.Event()
    loop.call_soon(lambda: seen.append(threading.current_thread().name))
    loop.call_soon(done.set)
    assert done.wait(5.0)
    assert seen == ["test-reactor"]
    assert loop.wait_stopped(5.0) and not loop.running
    again = threading.Event()
    loop.call_soon(again.set)  # a new thread starts on demand
    assert again.wait(5.0) and loop.wait_stopped(5.0)


def test_timers_follow_the_injected_clock() -> None:
    clock = FakeClock()
    loop = Reactor(lambda: 0.01, clock=clock, name="test-reactor")
    armed = threading.Event()
    fired = threading.Event()
    order: List[str] = []

    def arm() -> None:
        loop.call_later(5.0, lambda: (order.append("late"), fired.set()))
        loop.call_later(1.0, lambda: order.append("early"))
        armed.set()

    loop.call_soon(arm)
    assert armed.wait(5.0)
    woke = threading.Event()
    loop.call_soon(woke.set)
    assert woke.wait(5.0) and order == []  # the fake clock has not moved
    clock.now += 1.0
    loop.call_soon(lambda: None)  # wake the loop: it looks at the clock again
    clock.now += 4.0
    loop.call_soon(lambda: None)
    assert fired.wait(5.0)
    assert order == ["early", "late"]
    assert loop.wait_stopped(10.0)


def test_a_readable_socket_runs_its_callback_and_a_failing_callback_does_not_stop_the_loop() -> None:
    loop = Reactor(lambda: 0.01, name="test-reactor")
    a, b = socket.socketpair()
    a.setblocking(False)
    got = threading.Event()
    data: List[bytes] = []

    def readable() -> None:
        data.append(a.recv(100))
        loop.remove_reader(a)
        got.set()

    def broken() -> None:
        raise RuntimeError("a bug in one callback")

    try:
        loop.call_soon(broken)
        loop.call_soon(lambda: loop.add_reader(a, readable))
        b.send(b"ping")
        assert got.wait(5.0) and data == [b"ping"]
        assert loop.wait_stopped(5.0)  # no reader left, no timer: it ends
    finally:
        a.close()
        b.close()


# -- the worker pool ----------------------------------------------------------------------------


def test_the_pool_caps_its_threads_runs_jobs_in_order_and_lets_idle_workers_go() -> None:
    linger = [5.0]
    pool = WorkerPool(2, lambda: linger[0], "test-worker")
    gate = threading.Event()
    started = threading.Semaphore(0)
    ran: List[int] = []

    def job(n: int) -> None:
        started.release()
        gate.wait(5.0)
        ran.append(n)

    for n in range(6):
        pool.submit(lambda n=n: job(n))  # type: ignore[misc]
    assert started.acquire(timeout=5.0) and started.acquire(timeout=5.0)
    assert pool.threads == 2  # capped, though six jobs wait
    gate.set()
    assert pool.wait_quiet(5.0)
    assert sorted(ran) == list(range(6))
    linger[0] = 0.0
    pool.nudge()  # idle workers look at the linger again and end
    for thread in [t for t in threading.enumerate() if t.name.startswith("test-worker")]:
        thread.join(5.0)
    assert pool.threads == 0


def test_one_worker_runs_jobs_in_the_order_they_came() -> None:
    pool = WorkerPool(1, lambda: 0.0, "test-worker")
    ran: List[int] = []
    for n in range(20):
        pool.submit(lambda n=n: ran.append(n))  # type: ignore[misc]
    assert pool.wait_quiet(5.0)
    assert ran == list(range(20))


def test_a_failing_job_is_logged_and_the_worker_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(1, lambda: 0.0, "test-worker")
    done = threading.Event()
    pool.submit(lambda: 1 / 0)  # type: ignore[arg-type, func-returns-value]
    pool.submit(done.set)
    assert done.wait(5.0)
    assert any("background job failed" in r.getMessage() for r in caplog.records)
    assert pool.wait_quiet(5.0)
