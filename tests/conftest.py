"""Shared fixtures: a task factory and a guard that no test leaks threads."""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from tgi_adapter import TaskRequest

settings.register_profile(
    "project",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=200,
)
settings.load_profile("project")


@pytest.fixture(name="make_task")
def _make_task() -> Callable[..., TaskRequest]:
    counter = iter(range(1_000_000))

    def make(**overrides: Any) -> TaskRequest:
        values: dict = {  # type: ignore[type-arg]
            "task_id": f"t-{next(counter)}",
            "session_id": "s-1",
            "workload": "completion",
            "model_ref": "hf:org/model",
            "engine": "tgi",
            "ctx": 2048,
            "priority": "interactive",
            "max_tokens": 8,
            "deadline_ms": 10_000,
            "prompt": "Hello there",
        }
        values.update(overrides)
        return TaskRequest(**values)

    return make


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = []
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5.0)
        if thread.is_alive():
            leaked.append(thread.name)
    assert not leaked, f"threads left running: {leaked}"
