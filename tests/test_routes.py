"""The three routes behind one contract: the same invariants, cancel, timeouts and faults."""

from __future__ import annotations

import time
from typing import Callable, List

import pytest

from tgi_adapter import AdapterConfig, RetryPolicy, TaskRequest, TgiHttpAdapter, Timeouts, TokenEvent
from tgi_adapter.testing import FakeTgiServer, Fault

from test_faults import ROWS, Row, run_row
from test_streaming import check_invariants, text_of

MakeTask = Callable[..., TaskRequest]
ROUTES = ["native", "openai-completions", "openai-chat"]
PATHS = {"native": "/generate_stream", "openai-completions": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("version", ["2.2.0", "3.3.6"])
def test_each_route_keeps_the_invariants(route: str, version: str, make_task: MakeTask) -> None:
    config = AdapterConfig(route=route)
    with FakeTgiServer(version=version) as server, TgiHttpAdapter(server.url, config=config) as adapter:
        events: List[TokenEvent] = list(adapter.submit(make_task(max_tokens=10, seed=5)))
        text, end = adapter.generate(make_task(max_tokens=10, seed=5))
    check_invariants(events)
    assert text_of(events) == text
    assert events[-1].data["tokens_out"] == 10 == end["tokens_out"]
    assert events[-1].data["finish_reason"] == "length" == end["finish_reason"]
    paths = [r.path for r in server.requests if r.method == "POST"]
    assert paths == [PATHS[route], "/generate" if route == "native" else PATHS[route]]
    if route != "native" and version >= "3":
        assert events[-1].data["tokens_in"] is not None


@pytest.mark.parametrize("route", ["openai-completions", "openai-chat"])
def test_openai_bodies_send_tgi_as_model_and_greedy_as_temperature_zero(route: str, make_task: MakeTask) -> None:
    with FakeTgiServer() as server, TgiHttpAdapter(server.url, config=AdapterConfig(route=route)) as adapter:
        list(adapter.submit(make_task(max_tokens=4, seed=9, determinism="strict")))
    body = server.requests[-1].json
    assert body["model"] == "tgi"
    assert body["temperature"] == 0.0 and "top_p" not in body
    assert body["seed"] == 9 and body["max_tokens"] == 4 and body["stream"] is True
    if route == "openai-chat":
        assert body["messages"] == [{"role": "user", "content": "Hello there"}]
        assert body["stream_options"] == {"include_usage": True}
    else:
        assert body["prompt"] == "Hello there"


def test_chat_takes_a_conversation_as_inputs(make_task: MakeTask) -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    with FakeTgiServer() as server, TgiHttpAdapter(server.url, config=AdapterConfig(route="openai-chat")) as adapter:
        events = list(adapter.submit(make_task(prompt=None, inputs=conversation, max_tokens=3)))
    check_invariants(events)
    assert server.requests[-1].json["messages"] == conversation


def test_eos_maps_to_eos_token_on_every_route(make_task: MakeTask) -> None:
    for route in ROUTES:
        with FakeTgiServer(eos_after=3) as server, TgiHttpAdapter(server.url, config=AdapterConfig(route=route)) as a:
            events = list(a.submit(make_task(max_tokens=20)))
        check_invariants(events)
        assert events[-1].data["finish_reason"] == "eos_token", route
        assert len([e for e in events if e.kind == "token"]) == 3, route


@pytest.mark.parametrize("route", ["openai-completions", "openai-chat"])
def test_cancel_on_openai_routes(route: str, make_task: MakeTask) -> None:
    with (
        FakeTgiServer(faults=[Fault("stall", at_token=2)]) as server,
        TgiHttpAdapter(server.url, config=AdapterConfig(route=route)) as adapter,
    ):
        task = make_task(max_tokens=30)
        stream = adapter.submit(task)
        assert [next(stream).kind for _ in range(3)] == ["started", "token", "token"]
        t0 = time.monotonic()
        adapter.cancel(task.task_id)
        assert [e.kind for e in stream] == ["end"]
        assert server.wait_for_disconnect(timeout=5.0)
        assert server.disconnects[-1].t - t0 < 0.5


STREAM_ROWS = [
    r
    for r in ROWS
    if r.name
    in {
        "503 unready",
        "429 with Retry-After seconds",
        "401 empty body",
        "502 HTML from a proxy",
        "RST mid-stream",
        "EOF before the final frame",
        "malformed JSON frame",
        "CUDA out of memory",
        "overloaded after a token is terminal",
        "silent between tokens",
        "keep-alive comments are not progress",
        "the task deadline",
        "silent before the first token",
    }
]


@pytest.mark.parametrize("route", ["openai-completions", "openai-chat"])
@pytest.mark.parametrize("row", STREAM_ROWS, ids=[r.name for r in STREAM_ROWS])
def test_fault_rows_on_openai_routes(route: str, row: Row, make_task: MakeTask) -> None:
    events, elapsed, _server = run_row(row, make_task, route=route)
    kinds = [e.kind for e in events]
    assert kinds[-1] == "error" and kinds.count("error") == 1, kinds
    assert kinds.count("token") == row.tokens_before
    data = events[-1].data
    assert (data["code"], data["retriable"], data["retry_after_ms"]) == (row.code, row.retriable, row.retry_after_ms)
    low, high = row.within
    assert low <= elapsed <= high


@pytest.mark.parametrize("route", ["openai-completions", "openai-chat"])
def test_openai_in_stream_errors_are_classified_by_message(route: str, make_task: MakeTask) -> None:
    cases = [
        (Fault("error_frame", at_token=0, error_type="overloaded"), "ADMISSION_REJECT"),
        (
            Fault(
                "error_frame",
                at_token=0,
                error_type="validation",
                message="Input validation error: `top_p` must be > 0.0 and < 1.0",
            ),
            "INVALID_PARAMS",
        ),
        (
            Fault(
                "error_frame",
                at_token=1,
                error_type="generation",
                message="Request failed during generation: Server error: NCCL timeout",
            ),
            "INTERNAL",
        ),
    ]
    config = AdapterConfig(route=route, retry=RetryPolicy(attempts=1), timeouts=Timeouts(connect=2.0))
    for fault, code in cases:
        with FakeTgiServer(faults=[fault]) as server, TgiHttpAdapter(server.url, config=config) as adapter:
            events = list(adapter.submit(make_task(max_tokens=5)))
        assert events[-1].kind == "error" and events[-1].data["code"] == code, (fault, events[-1].data)
