"""health, engine_info, engine_version, props and the fit policy, with mocked HTTP."""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Iterator, List

import pytest
import requests
import responses

from tgi_adapter import AdapterConfig, ErrorKind, TaskRequest, TgiHttpAdapter, WorkerError, WorkerHealth

from fixtures import INFO_2_0, INFO_2_2, INFO_3, METRICS_TEXT, native_frames

URL = "http://tgi.test"
MakeTask = Callable[..., TaskRequest]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="mock")
def _mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture(name="clock")
def _clock() -> Clock:
    return Clock()


@pytest.fixture(name="adapter")
def _adapter(clock: Clock) -> Iterator[TgiHttpAdapter]:
    sleeps: List[float] = []
    adapter = TgiHttpAdapter(URL, clock=clock, sleep=sleeps.append, rng=lambda: 0.5)
    yield adapter
    adapter.close()


def posts(mock: responses.RequestsMock) -> List[Any]:
    return [call for call in mock.calls if call.request.method == "POST"]


# -- health -------------------------------------------------------------------------------


def test_health_200_is_live_and_ready(mock: responses.RequestsMock, adapter: TgiHttpAdapter) -> None:
    mock.get(f"{URL}/health", body=b"")
    assert adapter.health() == WorkerHealth(live=True, ready=True)


def test_health_503_is_live_not_ready(mock: responses.RequestsMock, adapter: TgiHttpAdapter) -> None:
    mock.get(f"{URL}/health", status=503, json={"error": "unhealthy", "error_type": "healthcheck"})
    assert adapter.health() == WorkerHealth(live=True, ready=False)


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ConnectionError("[Errno 111] Connection refused"),
        requests.exceptions.ConnectTimeout("connect timed out"),
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.SSLError("certificate verify failed"),
    ],
)
def test_health_without_an_answer_is_neither_and_never_raises(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, exc: Exception
) -> None:
    mock.get(f"{URL}/health", body=exc)
    assert adapter.health() == WorkerHealth(live=False, ready=False)


def test_health_feeds_the_health_gauges(mock: responses.RequestsMock, adapter: TgiHttpAdapter) -> None:
    mock.get(f"{URL}/health", status=503, json={"error": "unhealthy", "error_type": "healthcheck"})
    adapter.health()
    snap = adapter.metrics.snapshot()
    assert snap["engine_live"][0]["value"] == 1.0
    assert snap["engine_ready"][0]["value"] == 0.0


# -- /info ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "max_input", "version", "dtype"),
    [
        (INFO_2_0, 8191, "2.0.2+sha.dccab72", "torch.float16"),
        (INFO_2_2, 4095, "2.2.0+sha.db7e043", "torch.float16"),
        (INFO_3, 8191, "3.3.6+sha.1a2b3c4", None),
    ],
)
def test_engine_info_understands_each_era(
    mock: responses.RequestsMock,
    adapter: TgiHttpAdapter,
    info: Dict[str, Any],
    max_input: int,
    version: str,
    dtype: Any,
) -> None:
    mock.get(f"{URL}/info", json=info)
    got = adapter.engine_info()
    assert got.max_input_tokens == max_input
    assert got.max_total_tokens == info["max_total_tokens"]
    assert got.max_concurrent_requests == 128
    assert got.model_dtype == dtype
    assert got.model_id == info["model_id"]
    assert adapter.engine_version() == version
    if "waiting_served_ratio" in info:
        assert got.extra["waiting_served_ratio"] == 0.3
    assert "max_input_length" not in got.extra


def test_engine_info_is_cached_for_its_ttl(mock: responses.RequestsMock, adapter: TgiHttpAdapter, clock: Clock) -> None:
    rsp = mock.get(f"{URL}/info", json=INFO_3)
    adapter.engine_info()
    adapter.engine_version()
    assert rsp.call_count == 1
    clock.now += adapter.config.info_ttl + 1
    adapter.engine_info()
    assert rsp.call_count == 2


def test_engine_info_is_refetched_after_a_failed_connection(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter
) -> None:
    rsp = mock.get(f"{URL}/info", json=INFO_3)
    adapter.engine_info()
    mock.get(f"{URL}/metrics", body=requests.exceptions.ConnectionError("Connection refused"))
    with pytest.raises(WorkerError):
        adapter.metrics_text()
    adapter.engine_info()
    assert rsp.call_count == 2


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"status": 200, "body": b"<html>not json</html>"}, ErrorKind.INTERNAL),
        ({"status": 200, "json": [1, 2]}, ErrorKind.INTERNAL),
        ({"status": 503, "json": {"error": "unhealthy", "error_type": "healthcheck"}}, ErrorKind.POOL_UNREADY),
        ({"status": 404, "body": b""}, ErrorKind.POOL_UNAVAILABLE),
    ],
)
def test_engine_info_failures_are_worker_errors(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, kwargs: Dict[str, Any], code: ErrorKind
) -> None:
    mock.get(f"{URL}/info", **kwargs)
    with pytest.raises(WorkerError) as info:
        adapter.engine_info()
    assert info.value.code is code


def test_control_calls_retry_within_the_control_timeout(mock: responses.RequestsMock, clock: Clock) -> None:
    sleeps: List[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    adapter = TgiHttpAdapter(URL, clock=clock, sleep=sleep, rng=lambda: 1.0)
    try:
        mock.get(f"{URL}/info", body=requests.exceptions.ConnectionError("Connection refused"))
        with pytest.raises(WorkerError) as info:
            adapter.engine_info()
        assert info.value.code is ErrorKind.POOL_UNAVAILABLE
        assert info.value.retriable is True
        # capped full jitter with rng=1.0: 0.1, 0.2, 0.4 (4 attempts in all)
        assert sleeps == pytest.approx([0.1, 0.2, 0.4])
    finally:
        adapter.close()


# -- props ----------------------------------------------------------------------------------


def test_props_from_metrics(mock: responses.RequestsMock, adapter: TgiHttpAdapter) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    mock.get(f"{URL}/metrics", body=METRICS_TEXT)
    props = adapter.props()
    assert props.slots_total == 128
    assert props.slots_free == 128 - (3 + 5)
    assert props.slots_source == "metrics"
    assert props.max_total_tokens == 8192
    assert props.engine_version == "3.3.6+sha.1a2b3c4"


@pytest.mark.parametrize(
    "metrics",
    [
        {"status": 404, "body": b""},
        {"status": 200, "body": b"\x00\xffgarbage{{{ not prometheus"},
        {"status": 200, "body": b"# TYPE tgi_request_count counter\ntgi_request_count 4\n"},
        {"body": requests.exceptions.ConnectionError("refused")},
    ],
)
def test_props_fall_back_to_the_adapters_own_count(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, metrics: Dict[str, Any]
) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    mock.get(f"{URL}/metrics", **metrics)
    props = adapter.props()
    assert props.slots_free == 128
    assert props.slots_source == "adapter"


def test_props_floor_at_zero(mock: responses.RequestsMock, adapter: TgiHttpAdapter) -> None:
    mock.get(f"{URL}/info", json={**INFO_3, "max_concurrent_requests": 4})
    mock.get(f"{URL}/metrics", body=METRICS_TEXT)
    assert adapter.props().slots_free == 0


# -- fit policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(("ctx", "max_tokens"), [(8193, 16), (4096, 8192), (4096, 9000)])
def test_tasks_that_cannot_fit_fail_fast_without_a_post(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask, ctx: int, max_tokens: int
) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    with pytest.raises(WorkerError) as info:
        adapter.submit(make_task(ctx=ctx, max_tokens=max_tokens))
    assert info.value.code is ErrorKind.POOL_UNAVAILABLE
    assert info.value.retriable is False
    assert "max_total_tokens" in info.value.message
    assert posts(mock) == []


def test_a_task_that_fits_is_sent(mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    mock.post(f"{URL}/generate_stream", body=native_frames([" Hi", "!"]), content_type="text/event-stream")
    text, end = adapter.submit(make_task(ctx=8192, max_tokens=8191)).collect()
    assert text == " Hi!"
    assert len(posts(mock)) == 1


def test_without_info_submit_goes_on_and_the_wire_decides(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    mock.get(f"{URL}/info", status=404)
    mock.post(f"{URL}/generate_stream", body=native_frames([" ok"]), content_type="text/event-stream")
    events = list(adapter.submit(make_task(ctx=100_000)))
    assert [e.kind for e in events] == ["started", "token", "metrics", "end"]
    assert events[0].data["engine_version"] is None


def test_the_engines_own_token_limit_422_is_pool_unavailable(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    message = (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8192. "
        "Given: 8000 `inputs` tokens and 500 `max_new_tokens`"
    )
    body = b"data: " + json.dumps({"error": message, "error_type": "validation"}).encode() + b"\n\n"
    mock.post(f"{URL}/generate_stream", body=body, content_type="text/event-stream")
    events = list(adapter.submit(make_task(max_tokens=500)))
    assert [e.kind for e in events] == ["error"]
    assert events[0].data["code"] == "POOL_UNAVAILABLE"
    assert events[0].data["retriable"] is False


def test_cuda_oom_is_pool_unavailable(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    message = "Request failed during generation: Server error: CUDA out of memory. Tried to allocate 2.00 GiB"
    body = b"data: " + json.dumps({"error": message, "error_type": "generation"}).encode() + b"\n\n"
    mock.post(f"{URL}/generate_stream", body=body, content_type="text/event-stream")
    events = list(adapter.submit(make_task()))
    assert events[-1].data["code"] == "POOL_UNAVAILABLE"


def test_tokenize_check_refuses_a_prompt_over_the_limit(mock: responses.RequestsMock, make_task: MakeTask) -> None:
    mock.get(f"{URL}/info", json={**INFO_3, "max_input_tokens": 3, "max_total_tokens": 64})
    mock.post(f"{URL}/tokenize", json=[{"id": i, "text": "w", "start": i, "stop": i + 1} for i in range(10)])
    adapter = TgiHttpAdapter(URL, config=AdapterConfig(tokenize_check=True))
    try:
        with pytest.raises(WorkerError) as info:
            adapter.submit(make_task(max_tokens=8, ctx=64))
        assert info.value.code is ErrorKind.POOL_UNAVAILABLE
        assert "10 tokens" in info.value.message
        assert [c.request.url for c in posts(mock)] == [f"{URL}/tokenize"]
    finally:
        adapter.close()


# -- determinism -------------------------------------------------------------------------------


def sent_body(mock: responses.RequestsMock) -> Dict[str, Any]:
    body = posts(mock)[-1].request.body
    assert isinstance(body, bytes)
    parsed: Dict[str, Any] = json.loads(body)
    return parsed


def test_strict_sends_greedy_with_details_and_the_seed(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    from tgi_adapter import SamplingParams

    mock.get(f"{URL}/info", json=INFO_3)
    mock.post(f"{URL}/generate_stream", body=native_frames(["a"], seed=None), content_type="text/event-stream")
    task = make_task(
        determinism="strict", seed=7, sampling=SamplingParams(temperature=0.9, top_p=0.5, top_k=3, typical_p=0.5)
    )
    events = list(adapter.submit(task))
    params = sent_body(mock)["parameters"]
    assert params["do_sample"] is False
    assert params["details"] is True
    assert params["seed"] == 7
    assert params["max_new_tokens"] == task.max_tokens
    assert not {"temperature", "top_p", "top_k", "typical_p"} & set(params)
    started = events[0].data
    assert (started["seed"], started["determinism"]) == (7, "strict")
    assert started["engine_version"] == "3.3.6+sha.1a2b3c4"
    assert started["model_id"] == INFO_3["model_id"] and started["model_sha"] == INFO_3["model_sha"]
    assert events[-1].data["seed"] is None  # greedy: the engine reports no seed


def test_a_sampled_seed_is_echoed_in_end(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    mock.get(f"{URL}/info", json=INFO_3)
    seed = 18435558523380366744  # > 2**63: seeds are unsigned 64-bit
    mock.post(f"{URL}/generate_stream", body=native_frames(["a", "b"], seed=seed), content_type="text/event-stream")
    events = list(adapter.submit(make_task(seed=seed, sampler_profile_version="balanced-v1")))
    params = sent_body(mock)["parameters"]
    assert params["do_sample"] is True and params["temperature"] == 0.7 and params["seed"] == seed
    assert events[0].data["sampler_profile_version"] == "balanced-v1"
    assert events[-1].data["seed"] == seed


def test_rejected_combinations_never_reach_the_engine(
    mock: responses.RequestsMock, adapter: TgiHttpAdapter, make_task: MakeTask
) -> None:
    from tgi_adapter import SamplingParams

    mock.get(f"{URL}/info", json=INFO_3)
    for task, field in [
        (make_task(seed=1, sampling=SamplingParams(best_of=2, do_sample=True)), "sampling.best_of"),
        (make_task(sampling=SamplingParams(stop=("a", "b", "c", "d", "e"))), "sampling.stop"),
        (make_task(sampler_profile_version="wild-v9"), "sampler_profile_version"),
    ]:
        with pytest.raises(WorkerError) as info:
            adapter.submit(task)
        assert info.value.code is ErrorKind.INVALID_PARAMS
        assert repr(field) in info.value.message
    assert posts(mock) == []
