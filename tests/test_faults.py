"""The fault matrix: every failure the engine or the network can produce, over real sockets.

Each row asserts the code, the retriable flag, retry_after_ms, that the stream
ends with exactly one terminal event, and how long it took (short, generous
bounds: these are not benchmarks). The autouse fixture checks no thread leaks.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from tgi_adapter import AdapterConfig, RetryPolicy, TaskRequest, TgiHttpAdapter, Timeouts, TokenEvent
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"


@dataclass
class Row:
    name: str
    code: str
    retriable: bool
    faults: Tuple[Fault, ...] = ()
    server: Dict[str, Any] = field(default_factory=dict)
    timeouts: Dict[str, float] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    task: Dict[str, Any] = field(default_factory=dict)
    retry_after_ms: Optional[int] = None
    tokens_before: int = 0  # tokens the consumer sees before the error
    within: Tuple[float, float] = (0.0, 3.0)  # elapsed seconds, inclusive bounds
    token: Optional[str] = None
    refused: bool = False


ROWS: List[Row] = [
    Row("connection refused", "POOL_UNAVAILABLE", True, refused=True),
    Row("503 unready", "POOL_UNREADY", True, (Fault("status", status=503),)),
    Row(
        "429 with Retry-After seconds",
        "ADMISSION_REJECT",
        True,
        (Fault("status", status=429, headers={"Retry-After": "7"}),),
        retry_after_ms=7000,
    ),
    Row(
        "429 with retry-after-ms",
        "ADMISSION_REJECT",
        True,
        (Fault("status", status=429, headers={"retry-after-ms": "1500"}),),
        retry_after_ms=1500,
    ),
    Row(
        "422 JSON validation",
        "INVALID_PARAMS",
        False,
        (
            Fault(
                "status",
                status=422,
                body='{"error":"Input validation error: `top_k` must be strictly positive","error_type":"validation"}',
                content_type="application/json",
            ),
        ),
    ),
    Row(
        "422 plain text from the JSON extractor",
        "INVALID_PARAMS",
        False,
        (
            Fault(
                "status",
                status=422,
                content_type="text/plain; charset=utf-8",
                body="Failed to deserialize the JSON body into the target type: parameters.stop: invalid type",
            ),
        ),
    ),
    Row(
        "424 generation",
        "INTERNAL",
        False,
        (Fault("status", status=424, message="Request failed during generation: Server error: NCCL timeout"),),
    ),
    Row("500 incomplete_generation", "WORKER_RESET", True, (Fault("status", status=500),)),
    Row("401 empty body", "POOL_UNAVAILABLE", False, server={"api_key": "right-key"}, token="wrong-key"),
    Row(
        "413 payload too large",
        "INVALID_PARAMS",
        False,
        (
            Fault(
                "status",
                status=413,
                body="Failed to buffer the request body: length limit exceeded",
                content_type="text/plain",
            ),
        ),
    ),
    Row(
        "502 HTML from a proxy",
        "POOL_UNAVAILABLE",
        True,
        (Fault("status", status=502, body=HTML_502, content_type="text/html"),),
    ),
    Row("504 HTML from a proxy", "DECODE_TIMEOUT", True, (Fault("status", status=504),)),
    Row("RST mid-stream", "WORKER_RESET", True, (Fault("reset", at_token=3),), tokens_before=3),
    Row("RST inside the headers", "WORKER_RESET", True, (Fault("reset", at_byte=12),)),
    Row("EOF before the final frame", "WORKER_RESET", True, (Fault("truncate", at_token=3),), tokens_before=3),
    Row("FIN inside a chunk", "WORKER_RESET", True, (Fault("truncate", at_byte=400),), tokens_before=1),
    Row("closed before any answer", "WORKER_RESET", True, (Fault("disconnect_before_headers"),)),
    Row("malformed JSON frame", "INTERNAL", False, (Fault("malformed", at_token=2),), tokens_before=2),
    Row(
        "oversized frame",
        "INTERNAL",
        False,
        (Fault("oversized", at_token=1, size=8192),),
        config={"max_frame_bytes": 1024},
        tokens_before=1,
    ),
    Row(
        "unknown error_type",
        "INTERNAL",
        False,
        (Fault("error_frame", at_token=0, error_type="cosmic_ray", message="bit flipped"),),
    ),
    Row(
        "generation error after tokens",
        "INTERNAL",
        False,
        (
            Fault(
                "error_frame",
                at_token=4,
                error_type="generation",
                message="Request failed during generation: Server error: NCCL timeout",
            ),
        ),
        tokens_before=4,
    ),
    Row(
        "CUDA out of memory",
        "POOL_UNAVAILABLE",
        False,
        (
            Fault(
                "error_frame",
                at_token=0,
                error_type="generation",
                message="Request failed during generation: Server error: CUDA out of memory.",
            ),
        ),
    ),
    Row(
        "overloaded after a token is terminal",
        "ADMISSION_REJECT",
        True,
        (Fault("error_frame", at_token=2, error_type="overloaded"),),
        tokens_before=2,
    ),
    Row(
        "slow headers past the first-token timeout",
        "DECODE_TIMEOUT",
        True,
        (Fault("slow_headers", delay_s=5.0),),
        timeouts={"first_token": 0.3},
        within=(0.25, 1.5),
    ),
    Row(
        "silent before the first token",
        "DECODE_TIMEOUT",
        True,
        (Fault("stall", at_token=0),),
        timeouts={"first_token": 0.3},
        within=(0.25, 1.5),
    ),
    Row(
        "silent between tokens",
        "DECODE_TIMEOUT",
        True,
        (Fault("stall", at_token=3),),
        timeouts={"token_idle": 0.3},
        tokens_before=3,
        within=(0.25, 1.5),
    ),
    Row(
        "keep-alive comments are not progress",
        "DECODE_TIMEOUT",
        True,
        (Fault("keepalive_only", at_token=2, delay_s=0.05),),
        timeouts={"token_idle": 0.4},
        tokens_before=2,
        within=(0.35, 1.8),
    ),
    Row(
        "the task deadline",
        "DEADLINE_UNMET",
        False,
        server={"prefill_s": 5.0},
        task={"deadline_ms": 400},
        within=(0.35, 1.5),
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_row(row: Row, make_task: MakeTask, route: str = "native") -> Tuple[List[TokenEvent], float, FakeTgiServer]:
    timeouts = Timeouts(**{"connect": 2.0, **row.timeouts})
    config = AdapterConfig(timeouts=timeouts, retry=RetryPolicy(attempts=1), route=route, **row.config)
    with FakeTgiServer(faults=row.faults, **row.server) as server:
        url = f"http://127.0.0.1:{free_port()}" if row.refused else server.url
        with TgiHttpAdapter(url, token=row.token, config=config) as adapter:
            task = make_task(max_tokens=12, **row.task)
            t0 = time.monotonic()
            events = list(adapter.submit(task))
            elapsed = time.monotonic() - t0
    return events, elapsed, server


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_fault_matrix(row: Row, make_task: MakeTask) -> None:
    events, elapsed, _server = run_row(row, make_task)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "error" and kinds.count("error") == 1 and "end" not in kinds, kinds
    assert kinds.count("token") == row.tokens_before
    if row.tokens_before:
        assert kinds[0] == "started"
    else:
        assert kinds == ["error"]
    data = events[-1].data
    assert data["code"] == row.code, data
    assert data["retriable"] is row.retriable
    assert data["retry_after_ms"] == row.retry_after_ms
    assert data["engine"] == "tgi"
    assert "<" not in data["message"] and "nginx" not in data["message"]
    low, high = row.within
    assert low <= elapsed <= high, f"took {elapsed:.3f}s, expected [{low}, {high}]"


def test_a_first_overloaded_frame_is_retried_transparently(make_task: MakeTask) -> None:
    fault = Fault("error_frame", at_token=0, error_type="overloaded")
    with FakeTgiServer(faults=[fault]) as server, TgiHttpAdapter(server.url) as adapter:
        stream = adapter.submit(make_task(max_tokens=5))
        events = list(stream)
    assert [e.kind for e in events] == ["started"] + ["token"] * 5 + ["metrics", "end"]
    assert stream._channel.stats["retries"] == 1
    assert len([r for r in server.requests if r.path == "/generate_stream"]) == 2


def test_retries_stop_at_the_deadline(make_task: MakeTask) -> None:
    faults = [Fault("status", status=503, times=50)]
    policy = RetryPolicy(attempts=50, base=0.05, cap=0.05)
    with (
        FakeTgiServer(faults=faults) as server,
        TgiHttpAdapter(server.url, config=AdapterConfig(retry=policy)) as adapter,
    ):
        t0 = time.monotonic()
        events = list(adapter.submit(make_task(deadline_ms=500)))
        elapsed = time.monotonic() - t0
    assert [e.kind for e in events] == ["error"]
    assert events[0].data["code"] == "POOL_UNREADY"
    assert 0.3 <= elapsed <= 1.5


def test_a_retry_wait_is_interrupted_by_cancel(make_task: MakeTask) -> None:
    faults = [Fault("status", status=429, headers={"Retry-After": "20"})]
    policy = RetryPolicy(retry_after_cap=60.0)
    with (
        FakeTgiServer(faults=faults) as server,
        TgiHttpAdapter(server.url, config=AdapterConfig(retry=policy)) as adapter,
    ):
        task = make_task(deadline_ms=60_000)
        stream = adapter.submit(task)
        assert server.wait_for_requests(2, timeout=5.0)
        t0 = time.monotonic()
        adapter.cancel(task.task_id)
        events = list(stream)
        assert stream.join(timeout=2.0)
        assert time.monotonic() - t0 < 1.0
    assert [e.kind for e in events] == ["started", "end"]
    assert events[-1].data["finish_reason"] == "cancelled"


@pytest.mark.parametrize("kind", ["status", "stall"])
def test_generate_has_the_same_fault_mapping(kind: str, make_task: MakeTask) -> None:
    fault = Fault("status", status=503) if kind == "status" else Fault("stall")
    config = AdapterConfig(retry=RetryPolicy(attempts=1))
    with FakeTgiServer(faults=[fault]) as server, TgiHttpAdapter(server.url, config=config) as adapter:
        from tgi_adapter import WorkerError

        with pytest.raises(WorkerError) as info:
            adapter.generate(make_task(deadline_ms=400))
    expected = "POOL_UNREADY" if kind == "status" else "DEADLINE_UNMET"
    assert info.value.code.value == expected
