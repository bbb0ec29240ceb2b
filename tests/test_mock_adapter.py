"""MockAdapter: the contract with scripted answers, for orchestrator authors' tests."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from tgi_adapter import ErrorKind, TaskRequest, WorkerAdapter, WorkerError, WorkerHealth
from tgi_adapter.testing import MockAdapter, MockFault

from test_streaming import check_invariants

MakeTask = Callable[..., TaskRequest]


def test_it_is_a_worker_adapter_with_real_streams(make_task: MakeTask) -> None:
    mock = MockAdapter(text="one two three four")
    assert isinstance(mock, WorkerAdapter)
    events = list(mock.submit(make_task(max_tokens=3, seed=11)))
    check_invariants(events)
    assert [e.data["t"] for e in events if e.kind == "token"] == ["one", " two", " three"]
    assert events[-1].data["finish_reason"] == "length" and events[-1].data["seed"] == 11
    assert mock.generate(make_task(max_tokens=10)) == ("one two three four", mock.generate(make_task())[1])
    assert mock.submitted[0].max_tokens == 3


@pytest.mark.parametrize(
    ("fault", "kinds"),
    [
        (MockFault("error", code="ADMISSION_REJECT", at_token=0), ["error"]),
        (MockFault("error", code="WORKER_RESET", at_token=2), ["started", "token", "token", "error"]),
    ],
)
def test_scripted_errors(fault: MockFault, kinds: list, make_task: MakeTask) -> None:  # type: ignore[type-arg]
    mock = MockAdapter(faults=(fault,))
    events = list(mock.submit(make_task()))
    assert [e.kind for e in events] == kinds
    assert events[-1].data["code"] == fault.code
    assert [e.kind for e in mock.submit(make_task())][-1] == "end"  # used up


def test_raise_fault_and_stall_with_cancel(make_task: MakeTask) -> None:
    mock = MockAdapter(faults=(MockFault("raise", code="POOL_UNAVAILABLE", retriable=False),))
    with pytest.raises(WorkerError) as info:
        mock.submit(make_task())
    assert info.value.code is ErrorKind.POOL_UNAVAILABLE and not info.value.retriable
    mock.inject(MockFault("stall", at_token=1))
    task = make_task(deadline_ms=60_000)
    stream = mock.submit(task)
    assert [next(stream).kind, next(stream).kind] == ["started", "token"]
    t0 = time.monotonic()
    mock.cancel(task.task_id)
    assert [e.kind for e in stream] == ["end"] and time.monotonic() - t0 < 1.0
    assert mock.cancelled == [task.task_id]


def test_health_props_and_version_are_settable() -> None:
    mock = MockAdapter(slots_total=2, engine_version="mock-9")
    assert mock.health() == WorkerHealth(live=True, ready=True)
    mock.ready = False
    assert mock.health() == WorkerHealth(live=True, ready=False)
    assert mock.props().slots_free == 2 and mock.engine_version() == "mock-9"


def test_bad_faults_are_refused() -> None:
    with pytest.raises(ValueError):
        MockFault("explode")
    with pytest.raises(ValueError):
        MockFault("error", code="NOT_A_CODE")
