"""HTTP statuses, error frames and retries on the stream and blocking paths (mocked HTTP)."""

from __future__ import annotations

import email.utils
import json
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import responses
from responses.registries import OrderedRegistry

from tgi_adapter import AdapterConfig, ErrorKind, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError

from fixtures import INFO_3, error_frame, native_frames

URL = "http://tgi.test"
STREAM = f"{URL}/generate_stream"
MakeTask = Callable[..., TaskRequest]


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, mock: responses.RequestsMock, policy: Optional[RetryPolicy] = None) -> None:
        self.mock = mock
        self.clock = Clock()
        self.sleeps: List[float] = []
        config = AdapterConfig(retry=policy or RetryPolicy())
        self.adapter = TgiHttpAdapter(URL, config=config, clock=self.clock, sleep=self.sleep, rng=lambda: 0.5)
        mock.get(f"{URL}/info", json=INFO_3)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds

    def stream_ok(self, texts: Tuple[str, ...] = (" fine",)) -> None:
        self.mock.post(STREAM, body=native_frames(list(texts)), content_type="text/event-stream")


@pytest.fixture(name="h")
def _harness() -> Iterator[Harness]:
    with responses.RequestsMock(registry=OrderedRegistry, assert_all_requests_are_fired=False) as mock:
        harness = Harness(mock)
        yield harness
        harness.adapter.close()


def kinds(events: List[Any]) -> List[str]:
    return [e.kind for e in events]


def run(h: Harness, task: TaskRequest) -> List[Any]:
    return list(h.adapter.submit(task))


ERROR_ROWS: List[Tuple[str, Dict[str, Any], str, bool]] = [
    (
        "422 json",
        {
            "status": 422,
            "json": {"error": "Input validation error: `top_k` must be strictly positive", "error_type": "validation"},
        },
        "INVALID_PARAMS",
        False,
    ),
    (
        "422 axum text",
        {
            "status": 422,
            "body": "Failed to deserialize the JSON body into the target type: "
            'parameters.stop: invalid type: string "x", expected a sequence at line 1 column 40',
            "content_type": "text/plain; charset=utf-8",
        },
        "INVALID_PARAMS",
        False,
    ),
    ("401 empty", {"status": 401, "body": b""}, "POOL_UNAVAILABLE", False),
    ("403", {"status": 403, "body": b"forbidden"}, "POOL_UNAVAILABLE", False),
    ("404", {"status": 404, "body": b""}, "POOL_UNAVAILABLE", False),
    (
        "413 text",
        {
            "status": 413,
            "body": "Failed to buffer the request body: length limit exceeded",
            "content_type": "text/plain",
        },
        "INVALID_PARAMS",
        False,
    ),
    (
        "424",
        {
            "status": 424,
            "json": {"error": "Request failed during generation: Server error: boom", "error_type": "generation"},
        },
        "INTERNAL",
        False,
    ),
    ("500 no type", {"status": 500, "body": b"Internal Server Error"}, "INTERNAL", False),
    ("418", {"status": 418, "body": b"teapot"}, "INTERNAL", False),
    (
        "400 text",
        {"status": 400, "body": "Failed to parse the request body as JSON", "content_type": "text/plain"},
        "INTERNAL",
        False,
    ),
]


@pytest.mark.parametrize(("name", "response", "code", "retriable"), ERROR_ROWS, ids=[r[0] for r in ERROR_ROWS])
def test_non_retriable_statuses_end_the_stream_with_one_error(
    h: Harness, make_task: MakeTask, name: str, response: Dict[str, Any], code: str, retriable: bool
) -> None:
    h.mock.post(STREAM, **response)
    events = run(h, make_task())
    assert kinds(events) == ["error"]
    data = events[0].data
    assert (data["code"], data["retriable"]) == (code, retriable)
    assert h.sleeps == []
    assert len([c for c in h.mock.calls if c.request.method == "POST"]) == 1


RETRIABLE_ROWS: List[Tuple[str, Dict[str, Any], str]] = [
    ("429", {"status": 429, "json": {"error": "Model is overloaded", "error_type": "overloaded"}}, "ADMISSION_REJECT"),
    ("503", {"status": 503, "json": {"error": "unhealthy", "error_type": "healthcheck"}}, "POOL_UNREADY"),
    (
        "500 incomplete",
        {"status": 500, "json": {"error": "Incomplete generation", "error_type": "incomplete_generation"}},
        "WORKER_RESET",
    ),
    (
        "502 html",
        {"status": 502, "body": "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", "content_type": "text/html"},
        "POOL_UNAVAILABLE",
    ),
    (
        "504 html",
        {"status": 504, "body": "<html><body>504 Gateway Time-out</body></html>", "content_type": "text/html"},
        "DECODE_TIMEOUT",
    ),
    ("refused", {"body": requests.exceptions.ConnectionError("Connection refused")}, "POOL_UNAVAILABLE"),
]


@pytest.mark.parametrize(("name", "response", "code"), RETRIABLE_ROWS, ids=[r[0] for r in RETRIABLE_ROWS])
def test_retriable_failures_are_retried_then_succeed(
    h: Harness, make_task: MakeTask, name: str, response: Dict[str, Any], code: str
) -> None:
    h.mock.post(STREAM, **response)
    h.stream_ok()
    events = run(h, make_task())
    assert kinds(events) == ["started", "token", "metrics", "end"]
    assert h.sleeps == [pytest.approx(0.05)]  # rng 0.5 × min(cap 2, base 0.1 × 2**0)


@pytest.mark.parametrize(("name", "response", "code"), RETRIABLE_ROWS, ids=[r[0] for r in RETRIABLE_ROWS])
def test_retriable_failures_give_up_after_the_attempts(
    h: Harness, make_task: MakeTask, name: str, response: Dict[str, Any], code: str
) -> None:
    for _ in range(4):
        h.mock.post(STREAM, **response)
    events = run(h, make_task())
    assert kinds(events) == ["error"]
    data = events[0].data
    assert (data["code"], data["retriable"]) == (code, True)
    assert h.sleeps == pytest.approx([0.05, 0.1, 0.2])
    assert "<" not in data["message"] and "nginx" not in data["message"]


@pytest.mark.parametrize(
    ("headers", "expected_sleep"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After": "1", "retry-after-ms": "1500"}, 1.5),
    ],
)
def test_retry_after_replaces_the_jitter(
    h: Harness, make_task: MakeTask, headers: Dict[str, str], expected_sleep: float
) -> None:
    h.mock.post(STREAM, status=429, headers=headers, json={"error": "Model is overloaded", "error_type": "overloaded"})
    h.stream_ok()
    assert kinds(run(h, make_task()))[-1] == "end"
    assert h.sleeps == [pytest.approx(expected_sleep)]


def test_retry_after_as_an_http_date(h: Harness, make_task: MakeTask) -> None:
    import time

    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    h.mock.post(STREAM, status=503, headers={"Retry-After": when}, body=b"")
    h.stream_ok()
    assert kinds(run(h, make_task()))[-1] == "end"
    assert 1.5 < h.sleeps[0] <= 3.0


def test_retry_after_over_the_cap_is_not_waited_for_but_reported(h: Harness, make_task: MakeTask) -> None:
    h.mock.post(
        STREAM,
        status=429,
        headers={"Retry-After": "120"},
        json={"error": "Model is overloaded", "error_type": "overloaded"},
    )
    events = run(h, make_task())
    assert kinds(events) == ["error"]
    assert events[0].data["retry_after_ms"] == 120_000
    assert events[0].data["code"] == "ADMISSION_REJECT"
    assert h.sleeps == []


def test_no_retry_wait_crosses_the_deadline(h: Harness, make_task: MakeTask) -> None:
    h.mock.post(
        STREAM,
        status=429,
        headers={"Retry-After": "5"},
        json={"error": "Model is overloaded", "error_type": "overloaded"},
    )
    events = run(h, make_task(deadline_ms=3000))
    assert events[0].data["code"] == "ADMISSION_REJECT"
    assert h.sleeps == []


def test_an_overloaded_frame_before_any_token_is_retried_transparently(h: Harness, make_task: MakeTask) -> None:
    h.mock.post(STREAM, body=error_frame("Model is overloaded", "overloaded"), content_type="text/event-stream")
    h.stream_ok((" a", " b"))
    stream = h.adapter.submit(make_task())
    events = list(stream)
    assert kinds(events) == ["started", "token", "token", "metrics", "end"]
    assert stream._channel.stats["retries"] == 1


def test_an_error_after_a_token_is_terminal(h: Harness, make_task: MakeTask) -> None:
    body = native_frames([" a", " b"])
    first_frame = body.split(b"\n\n")[0] + b"\n\n"
    h.mock.post(
        STREAM, body=first_frame + error_frame("Model is overloaded", "overloaded"), content_type="text/event-stream"
    )
    events = run(h, make_task())
    assert kinds(events) == ["started", "token", "error"]
    assert events[-1].data["code"] == "ADMISSION_REJECT"
    assert h.sleeps == []


def test_eof_before_the_final_frame_after_tokens_is_worker_reset(h: Harness, make_task: MakeTask) -> None:
    body = native_frames([" a", " b", " c"])
    h.mock.post(STREAM, body=body.rsplit(b"data:", 1)[0], content_type="text/event-stream")
    events = run(h, make_task())
    assert kinds(events) == ["started", "token", "token", "error"]
    assert events[-1].data["code"] == "WORKER_RESET"


def test_a_malformed_frame_is_internal(h: Harness, make_task: MakeTask) -> None:
    h.mock.post(STREAM, body=b'data: {"index":1,"tok\n\n', content_type="text/event-stream")
    events = run(h, make_task())
    assert kinds(events) == ["error"]
    assert (events[0].data["code"], events[0].data["retriable"]) == ("INTERNAL", False)


def test_an_oversized_frame_is_an_error_not_unbounded_memory(make_task: MakeTask) -> None:
    with responses.RequestsMock() as mock:
        mock.get(f"{URL}/info", json=INFO_3)
        mock.post(STREAM, body=b"data: {" + b'"x":"' + b"y" * 5000 + b'"}\n\n', content_type="text/event-stream")
        with TgiHttpAdapter(URL, config=AdapterConfig(max_frame_bytes=1024)) as adapter:
            events = list(adapter.submit(make_task()))
    assert kinds(events) == ["error"]
    assert events[0].data["code"] == "INTERNAL"
    assert "max_frame_bytes" in events[0].data["message"]


# -- the blocking call ------------------------------------------------------------------------


def test_generate_returns_text_and_end_data(h: Harness, make_task: MakeTask) -> None:
    body = {
        "generated_text": " Hello!",
        "details": {"finish_reason": "eos_token", "generated_tokens": 3, "seed": None, "prefill": [], "tokens": []},
    }
    h.mock.post(f"{URL}/generate", json=body, headers={"x-prompt-tokens": "4", "x-inference-time": "12"})
    text, end = h.adapter.generate(make_task())
    assert text == " Hello!"
    assert end == {
        "tokens_out": 3,
        "decode_ms": 12,
        "finish_reason": "eos_token",
        "tokens_in": 4,
        "seed": None,
        "engine_version": "3.3.6+sha.1a2b3c4",
    }
    sent = json.loads(h.mock.calls[-1].request.body)
    assert sent["parameters"]["details"] is True


def test_generate_retries_and_raises_worker_errors(h: Harness, make_task: MakeTask) -> None:
    h.mock.post(f"{URL}/generate", status=429, json={"error": "Model is overloaded", "error_type": "overloaded"})
    h.mock.post(
        f"{URL}/generate",
        status=422,
        json={"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"},
    )
    with pytest.raises(WorkerError) as info:
        h.adapter.generate(make_task())
    assert info.value.code is ErrorKind.INVALID_PARAMS
    assert h.sleeps == [pytest.approx(0.05)]


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("Connection refused"),
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.ChunkedEncodingError("broken"),
        requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"),
        requests.exceptions.ProxyError("proxy said no"),
        ValueError("something unexpected"),
    ],
)
def test_no_raw_library_exception_escapes_a_public_call(h: Harness, make_task: MakeTask, exc: Exception) -> None:
    for _ in range(4):
        h.mock.post(f"{URL}/generate", body=exc)
        h.mock.post(STREAM, body=exc)
    with pytest.raises(WorkerError):
        h.adapter.generate(make_task())
    events = run(h, make_task())
    assert kinds(events) == ["error"]
