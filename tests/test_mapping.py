"""Pure mapping between the contract and TGI's HTTP API: errors, request bodies, /info, /metrics, answers."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_adapter.contract import U64_MAX, EngineInfo, SamplingParams, TaskRequest
from tgi_adapter.errors import ErrorKind, InvalidParamsError, WorkerError, error_class
from tgi_adapter.mapping import (
    ERROR_TABLE,
    SAMPLER_PROFILES,
    build_request,
    check_fit,
    effective_sampling,
    engine_info_from_json,
    error_for,
    error_from_frame,
    error_from_openai_frame,
    error_from_status,
    parse_prometheus,
    result_from_body,
    slots_free_from_metrics,
)

MakeTask = Callable[..., TaskRequest]
K = ErrorKind


def all_renderings(err: WorkerError) -> str:
    """Every way an error's text leaves the library."""
    parts = [str(err), repr(err), err.message, err.full_message]
    return "\n".join(parts + [json.dumps(err.to_event().data), json.dumps(err.to_envelope())])


# --------------------------------------------------------------------------
# The error table

# DESIGN.md §3 and §7, row by row: the code and whether a retry can help.
DESIGN_ROWS: Dict[str, Tuple[ErrorKind, bool]] = {
    "invalid_task": (K.INVALID_PARAMS, False),
    "does_not_fit": (K.POOL_UNAVAILABLE, False),
    "engine_oom": (K.POOL_UNAVAILABLE, False),
    "connect_failed": (K.POOL_UNAVAILABLE, True),
    "tls": (K.POOL_UNAVAILABLE, False),
    "auth": (K.POOL_UNAVAILABLE, False),
    "unready": (K.POOL_UNREADY, True),
    "overloaded": (K.ADMISSION_REJECT, True),
    "validation": (K.INVALID_PARAMS, False),
    "generation": (K.INTERNAL, False),
    "incomplete": (K.WORKER_RESET, True),
    "reset": (K.WORKER_RESET, True),
    "bad_gateway": (K.POOL_UNAVAILABLE, True),
    "gateway_timeout": (K.DECODE_TIMEOUT, True),
    "first_token_timeout": (K.DECODE_TIMEOUT, True),
    "token_idle_timeout": (K.DECODE_TIMEOUT, True),
    "deadline": (K.DEADLINE_UNMET, False),
    "malformed": (K.INTERNAL, False),
    "server_error": (K.INTERNAL, False),
}


def test_error_table_keys_are_unique_and_cover_the_design() -> None:
    keys = [rule.key for rule in ERROR_TABLE]
    assert len(keys) == len(set(keys))
    assert set(DESIGN_ROWS) <= set(keys)
    for rule in ERROR_TABLE:
        assert rule.what and rule.advice
        if rule.key in DESIGN_ROWS:
            assert (rule.code, rule.retriable) == DESIGN_ROWS[rule.key], rule.key


@pytest.mark.parametrize("rule", ERROR_TABLE, ids=lambda r: r.key)
def test_every_row_is_reachable_through_error_for(rule: Any) -> None:
    err = error_for(rule.key)
    assert type(err) is error_class(rule.code)
    assert err.code is rule.code
    assert err.retriable is rule.retriable
    assert err.message == rule.what
    assert err.advice == rule.advice
    assert err.retry_after_ms is None
    data = err.to_event().data
    assert data["code"] == rule.code.value and data["retriable"] is rule.retriable
    assert data["engine"] == "tgi"
    detailed = error_for(rule.key, "engine said\n  no", retry_after_ms=250, retriable=not rule.retriable)
    assert detailed.message == f"{rule.what}: engine said no"
    assert detailed.retry_after_ms == 250 and detailed.retriable is (not rule.retriable)


def test_error_for_unknown_key_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        error_for("no_such_row")


# --------------------------------------------------------------------------
# HTTP statuses

JSON_CT = "application/json"
TEXT_CT = "text/plain; charset=utf-8"
HTML_CT = "text/html"
NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
    b"<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)
ELB_504 = b"<!DOCTYPE html><html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


def tgi_error(message: str, error_type: Optional[str]) -> bytes:
    body: Dict[str, Any] = {"error": message}
    if error_type is not None:
        body["error_type"] = error_type
    return json.dumps(body).encode()


STATUS_CASES = [
    # status, body, content type, code, retriable
    (422, tgi_error("Input validation error: `top_p` must be > 0.0 and < 1.0", "validation"), JSON_CT,
     K.INVALID_PARAMS, False),
    (422, tgi_error("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1512. Given: 2 `inputs` "
                    "tokens and 10000 `max_new_tokens`", "validation"), JSON_CT, K.POOL_UNAVAILABLE, False),
    (422, tgi_error("Input validation error: `inputs` must have less than 4095 tokens. Given: 5000", "validation"),
     JSON_CT, K.POOL_UNAVAILABLE, False),
    (422, b"Failed to deserialize the JSON body into the target type: parameters.seed: invalid value: integer `-1`, "
          b"expected u64 at line 1 column 40", TEXT_CT, K.INVALID_PARAMS, False),
    (422, tgi_error("Template error: template not found", "template_error"), JSON_CT, K.INVALID_PARAMS, False),
    (422, b'[{"error":"Input validation error: `temperature` must be strictly positive","error_type":"validation"}]',
     JSON_CT, K.INVALID_PARAMS, False),
    (422, b'{"error":{"message":"Input validation error: bad","http_status_code":422}}', JSON_CT, K.INVALID_PARAMS,
     False),
    (429, tgi_error("Model is overloaded", "overloaded"), JSON_CT, K.ADMISSION_REJECT, True),
    (429, b"", "", K.ADMISSION_REJECT, True),
    (503, tgi_error("unhealthy", "healthcheck"), JSON_CT, K.POOL_UNREADY, True),
    (503, b"", "", K.POOL_UNREADY, True),
    (424, tgi_error("Request failed during generation: Server error: shard failed", "generation"), JSON_CT,
     K.INTERNAL, False),
    (424, tgi_error("Request failed during generation: Server error: CUDA out of memory. Tried to allocate 20.00 MiB",
                    "generation"), JSON_CT, K.POOL_UNAVAILABLE, False),
    (500, tgi_error("Incomplete generation", "incomplete_generation"), JSON_CT, K.WORKER_RESET, True),
    (500, tgi_error("something broke", None), JSON_CT, K.INTERNAL, False),
    (500, b"Internal Server Error", TEXT_CT, K.INTERNAL, False),
    (401, b"", "", K.POOL_UNAVAILABLE, False),
    (403, b"Forbidden", TEXT_CT, K.POOL_UNAVAILABLE, False),
    (404, b"", "", K.POOL_UNAVAILABLE, False),
    (413, b"Failed to buffer the request body: length limit exceeded", TEXT_CT, K.INVALID_PARAMS, False),
    (400, b"Failed to parse the request body as JSON: EOF while parsing an object at line 1 column 10", TEXT_CT,
     K.INTERNAL, False),
    (415, b"Expected request with `Content-Type: application/json`", TEXT_CT, K.INTERNAL, False),
    (502, NGINX_502, HTML_CT, K.POOL_UNAVAILABLE, True),
    (502, NGINX_502, "", K.POOL_UNAVAILABLE, True),
    (504, ELB_504, "text/html; charset=utf-8", K.DECODE_TIMEOUT, True),
    (504, b"", "", K.DECODE_TIMEOUT, True),
    (418, b"I'm a teapot", TEXT_CT, K.INTERNAL, False),
    (599, b"", "", K.INTERNAL, False),
    # a proxy answering for TGI keeps its status meaning whatever JSON it sends
    (502, tgi_error("upstream said", "overloaded"), JSON_CT, K.POOL_UNAVAILABLE, True),
    (401, tgi_error("bad token", "validation"), JSON_CT, K.POOL_UNAVAILABLE, False),
    # an error_type this adapter does not know falls back to the status
    (429, tgi_error("slow down", "rate_limited"), JSON_CT, K.ADMISSION_REJECT, True),
    # a JSON content type with a body that is not JSON
    (500, b"oops not json", JSON_CT, K.INTERNAL, False),
]


@pytest.mark.parametrize(("status", "body", "content_type", "code", "retriable"), STATUS_CASES)
def test_error_from_status(status: int, body: bytes, content_type: str, code: ErrorKind, retriable: bool) -> None:
    err = error_from_status(status, body, content_type)
    assert err.code is code and err.retriable is retriable
    assert type(err) is error_class(code)
    assert f"HTTP {status}" in err.message
    assert err.retry_after_ms is None
    assert "\n" not in err.message


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"error":' + b"[" * 100_000])
def test_deeply_nested_json_body_is_an_error_not_an_exception(body: bytes) -> None:
    err = error_from_status(500, body, JSON_CT)
    assert err.code is K.INTERNAL


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [(502, NGINX_502, HTML_CT), (502, NGINX_502, ""), (504, ELB_504, "text/html"), (503, b"  \n<html>x</html>", "")],
)
def test_html_pages_are_not_quoted(status: int, body: bytes, content_type: str) -> None:
    err = error_from_status(status, body, content_type)
    text = all_renderings(err)
    for fragment in ("<", ">", "nginx", "Bad Gateway", "Gateway Time-out", "respond in time", "html>"):
        assert fragment not in text
    assert "HTML" in err.message


def test_tgi_message_is_quoted() -> None:
    err = error_from_status(422, tgi_error("Input validation error: `top_k` must be strictly positive", "validation"),
                            JSON_CT)
    assert "`top_k` must be strictly positive" in err.message
    plain = error_from_status(413, b"Failed to buffer the request body: length limit exceeded", TEXT_CT)
    assert "length limit exceeded" in plain.message


@pytest.mark.parametrize("retry_after_ms", [None, 0, 1500, 120_000])
def test_retry_after_is_passed_through(retry_after_ms: Optional[int]) -> None:
    err = error_from_status(503, b"", "", retry_after_ms=retry_after_ms)
    assert err.retry_after_ms == retry_after_ms
    assert err.to_event().data["retry_after_ms"] == retry_after_ms
    assert err.to_envelope()["retry_after_ms"] == retry_after_ms


@pytest.mark.parametrize("content_type", [JSON_CT, TEXT_CT])
def test_long_bodies_are_clipped_to_one_line(content_type: str) -> None:
    message = "Input validation error: " + "very long explanation\n" * 500
    body = tgi_error(message, "validation") if content_type == JSON_CT else message.encode()
    err = error_from_status(422, body, content_type)
    rule = next(r for r in ERROR_TABLE if r.key == "validation")
    quoted = err.message[len(rule.what) + 2 :]
    assert err.message.startswith(rule.what + ": ")
    assert len(quoted) <= 200 and quoted.endswith("…")
    assert len(err.message) <= 300
    assert "\n" not in err.full_message


def test_every_clipped_message_stays_short() -> None:
    for rule in ERROR_TABLE:
        err = error_for(rule.key, "x" * 10_000)
        assert len(err.message) <= len(rule.what) + 2 + 200


SECRET = "tgi-SeCrEt-7f3a9b2c4d"
SECRET_BODIES = [
    tgi_error(f"Input validation error: header Authorization: Bearer {SECRET} rejected", "validation"),
    tgi_error(f"token={SECRET}", "generation"),
    f"upstream echoed: authorization={SECRET}; cookie=abc".encode(),
    f"proxy said {SECRET} {SECRET} " .encode() * 30,
    ("x" * 190 + SECRET).encode(),  # straddling the clipping point
    json.dumps({"error": {"message": f"bad key {SECRET}", "http_status_code": 422}}).encode(),
]


@pytest.mark.parametrize("status", [400, 401, 422, 424, 500, 503])
@pytest.mark.parametrize("body", SECRET_BODIES)
def test_a_known_secret_never_appears(status: int, body: bytes) -> None:
    content_type = JSON_CT if body.startswith(b"{") else TEXT_CT
    err = error_from_status(status, body, content_type, secrets=[SECRET, None])
    text = all_renderings(err)
    assert SECRET not in text
    assert SECRET[:12] not in text


@pytest.mark.parametrize(
    ("body", "leak"),
    [
        (b"Authorization: Bearer abcdef0123456789", "abcdef0123456789"),
        (b"authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA"),
        (b"request had token=abc123def and more", "abc123def"),
        (b"?access_token=zz9988xx&x=1", "zz9988xx"),
        (b"api_key: qwerty12345", "qwerty12345"),
        (b"X-API-Key: qwerty12345", "qwerty12345"),
        (b"used hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123 for the hub", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123"),
        (b'{"error":"password=hunter2hunter2","error_type":"validation"}', "hunter2hunter2"),
        (b"the bearer 0123456789abcdef was refused", "0123456789abcdef"),
    ],
)
def test_credentials_shaped_text_is_masked_without_being_told(body: bytes, leak: str) -> None:
    content_type = JSON_CT if body.startswith(b"{") else TEXT_CT
    err = error_from_status(422, body, content_type)
    assert leak not in all_renderings(err)


def test_error_from_frame_and_openai_frame_redact() -> None:
    frame_err = error_from_frame(f"Authorization: Bearer {SECRET}", "validation", [SECRET])
    openai_err = error_from_openai_frame({"message": f"Input validation error: {SECRET}"}, [SECRET])
    for err in (frame_err, openai_err):
        assert SECRET not in all_renderings(err)
        assert err.code is K.INVALID_PARAMS


@pytest.mark.parametrize(
    ("error", "error_type", "code"),
    [
        ("x", "validation", K.INVALID_PARAMS),
        ("x", "overloaded", K.ADMISSION_REJECT),
        ("x", "generation", K.INTERNAL),
        ("CUDA error: out of memory", "generation", K.POOL_UNAVAILABLE),
        ("x", "incomplete_generation", K.WORKER_RESET),
        ("x", "incomplete_generation_stream", K.WORKER_RESET),
        ("x", "healthcheck", K.POOL_UNREADY),
        ("x", "unknown", K.INTERNAL),
        ("x", None, K.INTERNAL),
        ("x", 42, K.INTERNAL),
        ({"nested": "object"}, "validation", K.INVALID_PARAMS),
        (None, "overloaded", K.ADMISSION_REJECT),
    ],
)
def test_error_from_frame(error: Any, error_type: Any, code: ErrorKind) -> None:
    assert error_from_frame(error, error_type).code is code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"message": "Model is overloaded", "http_status_code": 422}, K.ADMISSION_REJECT),
        ({"message": "Input validation error: `top_p` must be > 0.0 and < 1.0"}, K.INVALID_PARAMS),
        ({"message": "Input validation error: `max_new_tokens` must be <= 1024. Given: 5000"}, K.POOL_UNAVAILABLE),
        ({"message": "Request failed during generation: Server error: out of memory"}, K.POOL_UNAVAILABLE),
        ({"message": "Incomplete generation"}, K.WORKER_RESET),
        ({"message": "Template error: template not found"}, K.INVALID_PARAMS),
        ({"message": "Missing template vatiable: name"}, K.INVALID_PARAMS),
        ({}, K.INTERNAL),
        ("a bare string", K.INTERNAL),
        (None, K.INTERNAL),
    ],
)
def test_error_from_openai_frame(error: Any, code: ErrorKind) -> None:
    assert error_from_openai_frame(error).code is code


def test_token_limit_from_openai_frame_is_not_retriable() -> None:
    err = error_from_openai_frame(
        {"message": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` "
                    "tokens and 200 `max_new_tokens`", "http_status_code": 422}
    )
    assert err.code is K.POOL_UNAVAILABLE and not err.retriable


# --------------------------------------------------------------------------
# Request bodies

INFO = EngineInfo(max_total_tokens=4096, max_input_tokens=4095, max_stop_sequences=4, max_best_of=2)


def sampling(**values: Any) -> SamplingParams:
    return SamplingParams(**values)


def invalid_field(exc: pytest.ExceptionInfo[InvalidParamsError]) -> str:
    assert exc.value.code is K.INVALID_PARAMS and not exc.value.retriable
    return str(exc.value)


@pytest.mark.parametrize(("stream", "path"), [(True, "/generate_stream"), (False, "/generate")])
def test_native_body_of_a_plain_task(make_task: MakeTask, stream: bool, path: str) -> None:
    got_path, body = build_request(make_task(seed=42), route="native", stream=stream)
    assert got_path == path
    assert body == {
        "inputs": "Hello there",
        "parameters": {"max_new_tokens": 8, "details": True, "do_sample": False, "seed": 42},
    }


@pytest.mark.parametrize("seed", [None, 0, 2**63 + 5, U64_MAX])
def test_native_body_always_has_parameters_and_the_seed(make_task: MakeTask, seed: Optional[int]) -> None:
    _, body = build_request(make_task(seed=seed), route="native", stream=True)
    parameters = body["parameters"]
    assert parameters["details"] is True and parameters["max_new_tokens"] == 8
    if seed is None:
        assert "seed" not in parameters
    else:
        assert parameters["seed"] == seed
    json.dumps(body)  # JSON-ready


def test_sampling_values_reach_the_native_body(make_task: MakeTask) -> None:
    task = make_task(
        seed=7,
        sampling=sampling(temperature=0.7, top_k=40, top_p=0.9, typical_p=0.95, repetition_penalty=1.1,
                          frequency_penalty=0.5, stop=("\n\n", "###"), truncate=100, watermark=True),
    )
    _, body = build_request(task, route="native", stream=True, info=INFO)
    assert body["parameters"] == {
        "max_new_tokens": 8, "details": True, "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
        "typical_p": 0.95, "repetition_penalty": 1.1, "frequency_penalty": 0.5, "stop": ["\n\n", "###"],
        "truncate": 100, "watermark": True, "seed": 7,
    }


@pytest.mark.parametrize("profile", [None, "precise-v1", "creative-v1", "balanced-v1"])
def test_strict_determinism_is_greedy(make_task: MakeTask, profile: Optional[str]) -> None:
    task = make_task(
        determinism="strict",
        sampler_profile_version=profile,
        sampling=sampling(temperature=0.7, top_k=40, top_p=0.9, typical_p=0.5, do_sample=True, repetition_penalty=1.2),
    )
    _, native = build_request(task, route="native", stream=True)
    parameters = native["parameters"]
    assert parameters["do_sample"] is False
    for warper in ("temperature", "top_k", "top_p", "typical_p"):
        assert warper not in parameters
    assert parameters["repetition_penalty"] == 1.2  # not a warper: kept
    for route in ("openai-completions", "openai-chat"):
        task2 = make_task(determinism="strict", sampler_profile_version=profile,
                          sampling=sampling(temperature=0.7, top_p=0.9))
        _, body = build_request(task2, route=route, stream=True)
        assert body["temperature"] == 0.0 and "top_p" not in body


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"temperature": 0.0}, {"do_sample": False}),
        ({"temperature": 0}, {"do_sample": False}),
        ({"temperature": 0.0, "do_sample": True}, {"do_sample": False}),
        ({"top_p": 1.0}, {"do_sample": False}),
        ({"typical_p": 1.0}, {"do_sample": False}),
        ({"top_k": 0}, {"do_sample": False}),
        ({"best_of": 1}, {"do_sample": False}),
        ({"temperature": 1.0}, {"do_sample": False, "temperature": 1.0}),
        ({"top_p": 1.0, "top_k": 0, "typical_p": 1.0, "temperature": 0.5},
         {"do_sample": True, "temperature": 0.5}),
        ({"top_k": 5}, {"do_sample": True, "top_k": 5}),
        ({"do_sample": True}, {"do_sample": True}),
        ({"repetition_penalty": 1.3}, {"do_sample": False, "repetition_penalty": 1.3}),
    ],
)
def test_values_meaning_off_are_normalised(
    make_task: MakeTask, values: Dict[str, Any], expected: Dict[str, Any]
) -> None:
    assert effective_sampling(make_task(sampling=sampling(**values))) == expected


def test_greedy_native_body_has_no_temperature(make_task: MakeTask) -> None:
    # "do_sample": false with a temperature still samples in TGI's shards
    _, body = build_request(make_task(sampling=sampling(temperature=1.0)), route="native", stream=True)
    assert body["parameters"] == {"max_new_tokens": 8, "details": True, "do_sample": False}
    _, body = build_request(make_task(sampling=sampling(temperature=0.0)), route="native", stream=True)
    assert "temperature" not in body["parameters"] and body["parameters"]["do_sample"] is False


@pytest.mark.parametrize("name", sorted(SAMPLER_PROFILES))
def test_sampler_profiles_apply(make_task: MakeTask, name: str) -> None:
    values = effective_sampling(make_task(sampler_profile_version=name))
    for key, value in SAMPLER_PROFILES[name].items():
        if key == "do_sample":
            continue
        assert values[key] == value
    assert values["do_sample"] is bool(SAMPLER_PROFILES[name].get("do_sample"))


def test_task_sampling_overrides_the_profile(make_task: MakeTask) -> None:
    task = make_task(sampler_profile_version="precise-v1", sampling=sampling(temperature=0.5, top_k=10))
    _, body = build_request(task, route="native", stream=True)
    parameters = body["parameters"]
    assert parameters["temperature"] == 0.5 and parameters["top_p"] == 0.9 and parameters["top_k"] == 10
    assert parameters["do_sample"] is True
    greedy = make_task(sampler_profile_version="creative-v1", sampling=sampling(temperature=0.0, top_p=1.0))
    values = effective_sampling(greedy)
    assert "temperature" not in values and "top_p" not in values
    assert values["repetition_penalty"] == 1.05


def test_unknown_profile_is_refused_naming_the_field(make_task: MakeTask) -> None:
    with pytest.raises(InvalidParamsError) as exc:
        build_request(make_task(sampler_profile_version="turbo-v9"), route="native", stream=True)
    assert "'sampler_profile_version'" in invalid_field(exc)
    assert "turbo-v9" in str(exc.value)


@pytest.mark.parametrize(
    ("task_kwargs", "stream", "route"),
    [
        ({"seed": 1, "sampling": SamplingParams(best_of=2, do_sample=True)}, False, "native"),
        ({"seed": None, "sampling": SamplingParams(best_of=2)}, False, "native"),  # best_of needs sampling
        ({"seed": None, "sampling": SamplingParams(best_of=2, do_sample=True)}, True, "native"),  # not on a stream
        ({"seed": None, "sampling": SamplingParams(best_of=3, do_sample=True)}, False, "native"),  # > max_best_of
        ({"seed": None, "sampling": SamplingParams(best_of=2, do_sample=True)}, False, "openai-completions"),
        ({"seed": None, "sampling": SamplingParams(best_of=2, do_sample=True)}, False, "openai-chat"),
    ],
)
def test_best_of_rules(make_task: MakeTask, task_kwargs: Dict[str, Any], stream: bool, route: str) -> None:
    with pytest.raises(InvalidParamsError) as exc:
        build_request(make_task(**task_kwargs), route=route, stream=stream, info=INFO)
    assert "'sampling.best_of'" in invalid_field(exc)


def test_best_of_on_generate_without_a_seed_is_sent(make_task: MakeTask) -> None:
    task = make_task(seed=None, sampling=sampling(best_of=2, do_sample=True))
    path, body = build_request(task, route="native", stream=False, info=INFO)
    assert path == "/generate" and body["parameters"]["best_of"] == 2


def test_stop_sequences_over_the_engine_limit(make_task: MakeTask) -> None:
    four = make_task(sampling=sampling(stop=("a", "b", "c", "d")))
    _, body = build_request(four, route="native", stream=True, info=INFO)
    assert body["parameters"]["stop"] == ["a", "b", "c", "d"]
    five = make_task(sampling=sampling(stop=("a", "b", "c", "d", "e")))
    for route in ("native", "openai-completions", "openai-chat"):
        with pytest.raises(InvalidParamsError) as exc:
            build_request(five, route=route, stream=True, info=INFO)
        assert "'sampling.stop'" in invalid_field(exc)
    assert build_request(five, route="native", stream=True, info=None)[1]["parameters"]["stop"][-1] == "e"


def test_truncate_over_max_input_tokens(make_task: MakeTask) -> None:
    with pytest.raises(InvalidParamsError) as exc:
        build_request(make_task(sampling=sampling(truncate=5000)), route="native", stream=True, info=INFO)
    assert "'sampling.truncate'" in invalid_field(exc)


@pytest.mark.parametrize("route", ["openai-completions", "openai-chat"])
@pytest.mark.parametrize(("model", "expected"), [(None, "tgi"), ("my-lora", "my-lora")])
def test_openai_model_name(make_task: MakeTask, route: str, model: Optional[str], expected: str) -> None:
    kwargs = {} if model is None else {"model": model}
    _, body = build_request(make_task(), route=route, stream=True, **kwargs)
    assert body["model"] == expected


@pytest.mark.parametrize("stream", [True, False])
def test_openai_completions_body(make_task: MakeTask, stream: bool) -> None:
    path, body = build_request(make_task(seed=5), route="openai-completions", stream=stream)
    assert path == "/v1/completions"
    assert body == {"model": "tgi", "max_tokens": 8, "stream": stream, "prompt": "Hello there", "temperature": 0.0,
                    "seed": 5}
    task = make_task(sampling=sampling(temperature=0.8, top_p=0.95, repetition_penalty=1.2, frequency_penalty=-0.5,
                                       stop=("\n",)))
    _, body = build_request(task, route="openai-completions", stream=stream)
    assert body["temperature"] == 0.8 and body["top_p"] == 0.95
    assert body["repetition_penalty"] == 1.2 and body["frequency_penalty"] == -0.5 and body["stop"] == ["\n"]
    assert "stream_options" not in body and "seed" not in body


@pytest.mark.parametrize("stream", [True, False])
def test_openai_chat_body(make_task: MakeTask, stream: bool) -> None:
    path, body = build_request(make_task(seed=9), route="openai-chat", stream=stream)
    assert path == "/v1/chat/completions"
    expected: Dict[str, Any] = {
        "model": "tgi", "max_tokens": 8, "stream": stream,
        "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0.0, "seed": 9,
    }
    if stream:
        expected["stream_options"] = {"include_usage": True}
    assert body == expected


def test_openai_sampling_without_temperature_sends_one(make_task: MakeTask) -> None:
    # An absent temperature means "sample at 1.0" on these routes, so it is always sent.
    _, body = build_request(make_task(sampling=sampling(do_sample=True)), route="openai-chat", stream=True)
    assert body["temperature"] == 1.0 and "top_p" not in body
    _, body = build_request(make_task(sampling=sampling(top_p=0.5)), route="openai-chat", stream=True)
    assert body["temperature"] == 1.0 and body["top_p"] == 0.5


def test_chat_conversation_from_inputs(make_task: MakeTask) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    task = make_task(prompt=None, inputs=conversation)
    _, body = build_request(task, route="openai-chat", stream=True)
    assert body["messages"] == conversation
    body["messages"][0]["content"] = "changed"
    assert task.inputs is not None and task.inputs[0]["content"] == "Be brief."  # the body is a copy


@pytest.mark.parametrize("route", ["native", "openai-completions"])
def test_conversation_needs_the_chat_route(make_task: MakeTask, route: str) -> None:
    task = make_task(prompt=None, inputs=[{"role": "user", "content": "Hi"}])
    with pytest.raises(InvalidParamsError) as exc:
        build_request(task, route=route, stream=True)
    assert "'inputs'" in invalid_field(exc)


@pytest.mark.parametrize(("penalty", "presence"), [(1.0, -1.0), (1.2, -0.8), (2.0, 0.0), (3.5, 1.5)])
def test_chat_repetition_penalty_becomes_presence_penalty(make_task: MakeTask, penalty: float, presence: float) -> None:
    _, body = build_request(make_task(sampling=sampling(repetition_penalty=penalty)), route="openai-chat", stream=True)
    assert body["presence_penalty"] == pytest.approx(presence)
    assert "repetition_penalty" not in body


def test_chat_grammar_becomes_response_format(make_task: MakeTask) -> None:
    grammar = {"type": "json", "value": {"properties": {"a": {"type": "string"}}}}
    _, body = build_request(make_task(sampling=sampling(grammar=grammar)), route="openai-chat", stream=False)
    assert body["response_format"] == grammar


@pytest.mark.parametrize(
    ("route", "values", "field"),
    [
        ("openai-chat", {"top_k": 5}, "sampling.top_k"),
        ("openai-chat", {"typical_p": 0.5}, "sampling.typical_p"),
        ("openai-chat", {"truncate": 10}, "sampling.truncate"),
        ("openai-chat", {"watermark": True}, "sampling.watermark"),
        ("openai-completions", {"top_k": 5}, "sampling.top_k"),
        ("openai-completions", {"grammar": {"type": "regex", "value": "a+"}}, "sampling.grammar"),
    ],
)
def test_knobs_a_route_cannot_express_are_refused(
    make_task: MakeTask, route: str, values: Dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidParamsError) as exc:
        build_request(make_task(sampling=sampling(**values)), route=route, stream=True)
    assert f"'{field}'" in invalid_field(exc)


def test_top_k_zero_is_not_refused_on_chat(make_task: MakeTask) -> None:
    # 0 means "off" and is dropped before the route check
    _, body = build_request(make_task(sampling=sampling(top_k=0)), route="openai-chat", stream=True)
    assert "top_k" not in body


# --------------------------------------------------------------------------
# Fit


@pytest.mark.parametrize(
    ("ctx", "max_tokens", "prompt_tokens"),
    [(8192, 8, None), (4097, 8, None), (4096, 4096, None), (2048, 5000, None), (4096, 200, 4000), (4096, 8, 4096)],
)
def test_tasks_that_cannot_fit(make_task: MakeTask, ctx: int, max_tokens: int, prompt_tokens: Optional[int]) -> None:
    with pytest.raises(WorkerError) as exc:
        check_fit(make_task(ctx=ctx, max_tokens=max_tokens), INFO, prompt_tokens)
    assert exc.value.code is K.POOL_UNAVAILABLE and exc.value.retriable is False
    assert "max_total_tokens" in str(exc.value) or "max_input_tokens" in str(exc.value)


@pytest.mark.parametrize(
    ("ctx", "max_tokens", "prompt_tokens"), [(4096, 4095, None), (4096, 8, None), (1, 1, None), (4096, 96, 4000)]
)
def test_tasks_that_fit(make_task: MakeTask, ctx: int, max_tokens: int, prompt_tokens: Optional[int]) -> None:
    check_fit(make_task(ctx=ctx, max_tokens=max_tokens), INFO, prompt_tokens)


def test_fit_without_limits_passes(make_task: MakeTask) -> None:
    huge = make_task(ctx=10**6, max_tokens=10**6)
    check_fit(huge, None)
    check_fit(huge, EngineInfo())
    check_fit(huge, EngineInfo(max_total_tokens=None, max_input_tokens=10))


# --------------------------------------------------------------------------
# /info

INFO_2_0: Dict[str, Any] = {
    "model_id": "meta-llama/Meta-Llama-3-70B-Instruct", "model_sha": None, "model_dtype": "torch.float16",
    "model_device_type": "cuda", "model_pipeline_tag": None, "max_concurrent_requests": 128, "max_best_of": 2,
    "max_stop_sequences": 4, "max_input_length": 8191, "max_total_tokens": 8192, "waiting_served_ratio": 0.3,
    "max_batch_total_tokens": 1259392, "max_waiting_tokens": 20, "max_batch_size": None, "validation_workers": 32,
    "max_client_batch_size": 4, "version": "2.0.2", "sha": "dccab72549635c7eb5ddb17f43f0b7cdff07c214",
    "docker_label": "sha-dccab72",
}
INFO_2_2: Dict[str, Any] = {
    "model_id": "mistralai/Mistral-7B-Instruct-v0.3", "model_sha": "e0bc86c23ce5aae1db576c8cca6f06f1f73af2db",
    "model_dtype": "torch.bfloat16", "model_device_type": "cuda", "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4, "max_input_tokens": 4095,
    "max_total_tokens": 4096, "waiting_served_ratio": 0.3, "max_batch_total_tokens": 163840, "max_waiting_tokens": 20,
    "max_batch_size": None, "validation_workers": 2, "max_client_batch_size": 4, "router": "text-generation-router",
    "version": "2.2.0", "sha": None, "docker_label": None,
}
INFO_3: Dict[str, Any] = {
    "model_id": "meta-llama/Llama-3.1-8B-Instruct", "model_sha": "0e9e39f249a16976918f6564b8830bc894c89659",
    "model_pipeline_tag": "text-generation", "max_concurrent_requests": 128, "max_best_of": 2,
    "max_stop_sequences": 4, "max_input_tokens": 8191, "max_total_tokens": 8192, "validation_workers": 2,
    "max_client_batch_size": 4, "router": "text-generation-router", "version": "3.3.6",
    "sha": "1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b4c5", "docker_label": "sha-1a2b3c4",
}


def test_info_of_tgi_2_0() -> None:
    info = engine_info_from_json(INFO_2_0)
    assert info.max_input_tokens == 8191 and info.max_total_tokens == 8192
    assert info.model_dtype == "torch.float16" and info.model_device_type == "cuda"
    assert info.model_sha is None and info.router is None
    assert info.max_concurrent_requests == 128 and info.validation_workers == 32
    assert dict(info.extra) == {
        "waiting_served_ratio": 0.3, "max_batch_total_tokens": 1259392, "max_waiting_tokens": 20,
        "max_batch_size": None,
    }
    assert info.engine_version == "2.0.2+sha.dccab72"


def test_info_of_tgi_2_2() -> None:
    info = engine_info_from_json(INFO_2_2)
    assert info.max_input_tokens == 4095 and info.router == "text-generation-router"
    assert info.model_dtype == "torch.bfloat16"
    assert info.sha is None and info.docker_label is None
    assert info.engine_version == "2.2.0"


def test_info_of_tgi_3() -> None:
    info = engine_info_from_json(INFO_3)
    assert info == EngineInfo(
        model_id="meta-llama/Llama-3.1-8B-Instruct", model_sha="0e9e39f249a16976918f6564b8830bc894c89659",
        version="3.3.6", sha="1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b4c5", docker_label="sha-1a2b3c4",
        max_total_tokens=8192, max_input_tokens=8191, max_concurrent_requests=128, max_best_of=2,
        max_stop_sequences=4, max_client_batch_size=4, validation_workers=2, model_pipeline_tag="text-generation",
        model_dtype=None, model_device_type=None, router="text-generation-router", extra={},
    )
    assert info.engine_version == "3.3.6+sha.1a2b3c4"


def test_info_unknown_fields_are_kept_and_missing_ones_are_none() -> None:
    info = engine_info_from_json({"model_id": "m", "version": "9.9.9", "max_top_n_tokens": 5, "new": {"a": [1]}})
    assert info.extra == {"max_top_n_tokens": 5, "new": {"a": [1]}}
    assert info.max_total_tokens is None and info.max_input_tokens is None and info.sha is None
    assert engine_info_from_json({}) == EngineInfo()


def test_info_prefers_max_input_tokens_over_the_old_name() -> None:
    info = engine_info_from_json({"max_input_tokens": 100, "max_input_length": 50})
    assert info.max_input_tokens == 100 and "max_input_length" not in info.extra


@pytest.mark.parametrize("value", ["8192", True, 8192.0, None, [8192]])
def test_info_integer_fields_of_another_type_are_none(value: Any) -> None:
    assert engine_info_from_json({"max_total_tokens": value}).max_total_tokens is None


@pytest.mark.parametrize("data", [[INFO_3], "info", 3, None, b"{}"])
def test_info_that_is_not_an_object_raises(data: Any) -> None:
    with pytest.raises(ValueError):
        engine_info_from_json(data)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (EngineInfo(version="3.3.6", sha="1a2b3c4d5e6f", docker_label="sha-zzzzzzz"), "3.3.6+sha.1a2b3c4"),
        (EngineInfo(version="2.0.2", docker_label="sha-dccab72"), "2.0.2+sha-dccab72"),
        (EngineInfo(version="3.3.6"), "3.3.6"),
        (EngineInfo(sha="abcdef0123"), "unknown+sha.abcdef0"),
        (EngineInfo(), "unknown"),
    ],
)
def test_engine_version(info: EngineInfo, expected: str) -> None:
    assert info.engine_version == expected


# --------------------------------------------------------------------------
# /metrics

TGI_METRICS = """# HELP tgi_request_count Number of requests
# TYPE tgi_request_count counter
tgi_request_count 21
# TYPE tgi_request_success counter
tgi_request_success 17
# TYPE tgi_request_failure counter
tgi_request_failure{err="validation"} 2
tgi_request_failure{err="dropped"} 1
tgi_request_failure{err="overloaded"} 1
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_batch_current_max_tokens gauge
tgi_batch_current_max_tokens 2048
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.00015"} 0
tgi_request_duration_bucket{le="0.000225"} 0
tgi_request_duration_bucket{le="+Inf"} 21
tgi_request_duration_sum 12.5
tgi_request_duration_count 21
# TYPE tgi_request_skipped_tokens summary
tgi_request_skipped_tokens{quantile="0"} 0
tgi_request_skipped_tokens{quantile="0.5"} 1
tgi_request_skipped_tokens{quantile="1"} 2
tgi_request_skipped_tokens_sum 9
tgi_request_skipped_tokens_count 21
tgi_batch_inference_duration_sum{method="prefill"} 0.5
tgi_batch_inference_duration_sum{method="decode"} 1.25
tgi_with_timestamp 4 1700000000000
tgi_weird_value NaN
tgi_infinite +Inf
tgi_sci 1.5e3
"""


def test_parse_prometheus_of_tgi_text() -> None:
    metrics = parse_prometheus(TGI_METRICS)
    assert metrics["tgi_request_count"] == 21.0  # counters have no _total suffix
    assert "tgi_request_count_total" not in metrics
    assert metrics["tgi_request_success"] == 17.0
    assert metrics["tgi_request_failure"] == 4.0  # labelled series summed
    assert metrics["tgi_queue_size"] == 3.0 and metrics["tgi_batch_current_size"] == 5.0
    assert metrics["tgi_request_duration_sum"] == 12.5 and metrics["tgi_request_duration_count"] == 21.0
    assert metrics["tgi_request_duration_bucket"] == 21.0
    assert metrics["tgi_request_skipped_tokens"] == 3.0  # quantiles summed
    assert metrics["tgi_request_skipped_tokens_sum"] == 9.0
    assert metrics["tgi_batch_inference_duration_sum"] == 1.75
    assert metrics["tgi_with_timestamp"] == 4.0
    assert "tgi_weird_value" not in metrics
    assert math.isinf(metrics["tgi_infinite"])
    assert metrics["tgi_sci"] == 1500.0
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only comments\n# TYPE x gauge", "<html>404</html>", "not a metric line", "tgi_queue_size",
     "tgi_queue_size abc", "{bad} 1", "9starts_with_digit 3", "tgi_queue_size{unclosed 3"],
)
def test_parse_prometheus_skips_what_it_cannot_read(text: str) -> None:
    assert parse_prometheus(text) == {}


@settings(max_examples=150)
@given(text=st.one_of(st.text(), st.lists(st.sampled_from(TGI_METRICS.splitlines() + ["x{", "} 1", "a 1 2 3"]))
                      .map("\n".join)))
def test_parse_prometheus_never_raises(text: str) -> None:
    metrics = parse_prometheus(text)
    assert all(isinstance(k, str) and isinstance(v, float) and not math.isnan(v) for k, v in metrics.items())


@pytest.mark.parametrize(
    ("metrics", "total", "expected"),
    [
        ({"tgi_queue_size": 3.0, "tgi_batch_current_size": 5.0}, 128, 120),
        ({"tgi_queue_size": 100.0, "tgi_batch_current_size": 100.0}, 128, 0),  # floored at 0
        ({"tgi_batch_current_size": 4.0}, 8, 4),
        ({"tgi_queue_size": 2.0}, 8, 6),
        ({"tgi_queue_size": 0.0, "tgi_batch_current_size": 0.0}, 8, 8),
        ({"tgi_request_count": 5.0}, 8, None),  # the gauges are missing
        ({}, 8, None),
        ({"tgi_queue_size": 1.0}, None, None),
        ({"tgi_queue_size": math.inf}, 8, None),
    ],
)
def test_slots_free_from_metrics(metrics: Dict[str, float], total: Optional[int], expected: Optional[int]) -> None:
    assert slots_free_from_metrics(metrics, total) == expected


def test_slots_free_from_parsed_tgi_text() -> None:
    assert slots_free_from_metrics(parse_prometheus(TGI_METRICS), 128) == 120


# --------------------------------------------------------------------------
# Non-streaming answers

NATIVE_BODY = {
    "generated_text": "us",
    "details": {"finish_reason": "length", "generated_tokens": 1, "seed": 18435558523380366744,
                "prefill": [{"id": 9288, "text": "test", "logprob": None}],
                "tokens": [{"id": 385, "text": "us", "logprob": -7.5679407, "special": False}]},
}


@pytest.mark.parametrize("wrap", [False, True])
def test_result_from_native_body(wrap: bool) -> None:
    data: Any = [NATIVE_BODY] if wrap else NATIVE_BODY
    headers = {"x-prompt-tokens": "1", "x-inference-time": "26", "x-generated-tokens": "1"}
    text, end = result_from_body("native", data, headers, engine_version="3.0.1", elapsed_ms=99, sampled_seed=None)
    assert text == "us"
    assert end == {"tokens_out": 1, "decode_ms": 26, "finish_reason": "length", "tokens_in": 1,
                   "seed": 18435558523380366744, "engine_version": "3.0.1"}


def test_result_from_native_body_without_details() -> None:
    text, end = result_from_body("native", [{"generated_text": "{\n  \"a\": 1}"}], {}, engine_version=None,
                                 elapsed_ms=99, sampled_seed=7)
    assert text == "{\n  \"a\": 1}"
    assert end == {"tokens_out": 0, "decode_ms": 99, "finish_reason": "length", "tokens_in": None, "seed": None,
                   "engine_version": None}


@pytest.mark.parametrize(
    ("route", "body", "text", "finish"),
    [
        ("openai-completions", {"object": "text_completion", "id": "", "choices": [
            {"index": 0, "text": " A Beginner’s Guide", "logprobs": None, "finish_reason": "length"}],
            "usage": {"completion_tokens": 10, "prompt_tokens": 6, "total_tokens": 16}},
         " A Beginner’s Guide", "length"),
        ("openai-chat", {"object": "chat.completion", "id": "", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "1, 2, 3."}, "logprobs": None,
             "finish_reason": "stop"}], "usage": {"prompt_tokens": 6, "completion_tokens": 10, "total_tokens": 16}},
         "1, 2, 3.", "eos_token"),
        ("openai-chat", {"choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason":
                                      "stop_sequence"}], "usage": {"prompt_tokens": 6, "completion_tokens": 10}},
         "x", "stop_sequence"),
        ("openai-chat", {"choices": [{"message": {"role": "assistant", "tool_calls": [{"id": "0"}]},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 6, "completion_tokens": 10}},
         "", "eos_token"),
    ],
)
def test_result_from_openai_bodies(route: str, body: Dict[str, Any], text: str, finish: str) -> None:
    got_text, end = result_from_body(route, body, {"x-inference-time": "40"}, engine_version="3.2.1",
                                     elapsed_ms=50, sampled_seed=123)
    assert got_text == text
    assert end == {"tokens_out": 10, "decode_ms": 40, "finish_reason": finish, "tokens_in": 6, "seed": 123,
                   "engine_version": "3.2.1"}


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("native", {}),
        ("native", []),
        ("native", {"generated_text": None}),
        ("native", "text"),
        ("native", [1]),
        ("openai-chat", {"choices": []}),
        ("openai-chat", {}),
        ("openai-chat", {"choices": [1]}),
        ("openai-completions", {"choices": "x"}),
        ("openai-completions", None),
    ],
)
def test_result_from_body_of_the_wrong_shape_raises(route: str, body: Any) -> None:
    with pytest.raises(ValueError):
        result_from_body(route, body, {}, engine_version=None, elapsed_ms=1, sampled_seed=None)
