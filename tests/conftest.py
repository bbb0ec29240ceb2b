"""Shared fixtures: a task factory and a guard that no test leaks threads."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Tuple

import pytest
import trustme
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


@pytest.fixture(name="tls")
def _tls(tmp_path: Path) -> Iterator[Tuple[ssl.SSLContext, str]]:
    """A server TLS context for 127.0.0.1 and localhost, and the path of the CA bundle that trusts it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield context, str(path)


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
