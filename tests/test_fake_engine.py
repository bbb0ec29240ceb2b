"""The pure side of the fake TGI: faults, versions, generator, decoding, validation, rendering."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from tgi_adapter.testing.fake_axum import GENERATE_REQUEST, decode_body
from tgi_adapter.testing.fake_engine import (
    Fault,
    Limits,
    Params,
    Profile,
    Reply,
    count_tokens,
    generate,
    parse_version,
    planned_new_tokens,
    tokenize,
    validate,
)
from tgi_adapter.testing.fake_render import (
    Job,
    MetricsState,
    Stream,
    TgiRoutes,
    render_metrics,
    rust_float,
    status_reply,
)

JSON_HEADERS = {"content-type": "application/json"}


def routes(version: str = "3.3.6", **overrides: Any) -> TgiRoutes:
    options: dict[str, Any] = {
        "model_id": "org/model",
        "model_sha": None,
        "sha": "abc",
        "docker_label": None,
        "api_key": None,
        "eos_after": None,
        "utf8_split": False,
        "prefill_s": 0.0,
        "pace_s": 0.0,
        "rng": random.Random(7),
        "clock": lambda: 1700000000.5,
    }
    options.update(overrides)
    return TgiRoutes(Profile(version), Limits(), **options)


def answer(r: TgiRoutes, path: str, body: Any, *, overloaded: bool = False, fault: Fault | None = None) -> Any:
    accepted = r.accept("POST", path, JSON_HEADERS, json.dumps(body).encode(), True)
    if isinstance(accepted, Job):
        return r.run(accepted, overloaded=overloaded, fault=fault)
    return accepted


def frames_json(stream: Stream) -> list[Any]:
    out = []
    for frame in stream.frames:
        payload = frame.data.split(b":", 1)[1].strip()
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


# --- Fault --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "explode"}, "unknown fault kind"),
        ({"kind": "stall", "size": 10}, "does not take size"),
        ({"kind": "reset", "message": "x"}, "does not take message"),
        ({"kind": "status"}, "needs status"),
        ({"kind": "status", "status": 99}, "needs status"),
        ({"kind": "oversized"}, "needs size"),
        ({"kind": "truncate", "at_token": 2, "at_byte": 10}, "not both"),
        ({"kind": "stall", "times": 0}, "times"),
        ({"kind": "stall", "at_token": -1}, "at_token"),
        ({"kind": "stall", "path": "generate"}, "path"),
    ],
)
def test_fault_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fault(**kwargs)


def test_fault_matching_and_immutable_headers() -> None:
    fault = Fault("status", status=429, headers={"Retry-After": "1"})
    assert fault.matches("/generate_stream") and fault.matches("/v1/chat/completions")
    assert not fault.matches("/health") and not fault.matches("/info")
    assert Fault("stall", path="/health").matches("/health")
    assert not Fault("stall", path="/health").matches("/generate")
    assert fault.headers is not None
    with pytest.raises(TypeError):
        fault.headers["x"] = "y"  # type: ignore[index]


# --- versions -------------------------------------------------------------------


def test_version_profiles() -> None:
    assert parse_version("3.3.6-dev0") == (3, 3, 6)
    with pytest.raises(ValueError, match="not a TGI version"):
        parse_version("latest")
    assert Profile("2.0.4").sse_prefix == b"data:"
    assert Profile("2.1.0").sse_prefix == b"data: "
    defaults = {v: Profile(v).default_max_new_tokens for v in ("1.1.0", "1.3.0", "1.4.5", "2.4.1", "3.0.0")}
    assert defaults == {"1.1.0": 20, "1.3.0": None, "1.4.5": 100, "2.4.1": 100, "3.0.0": None}
    assert not Profile("1.3.4").has_route("/v1/chat/completions")
    assert Profile("1.4.4").has_route("/v1/completions") and not Profile("1.4.3").has_route("/v1/completions")


# --- tokenizer and generator -------------------------------------------------------


def test_tokenize_offsets_are_bytes() -> None:
    tokens = tokenize("Hi, café!")
    assert [t.text for t in tokens][:2] == ["Hi", ","]
    assert [(t.start, t.stop) for t in tokens] == [(0, 2), (2, 3), (4, 9), (9, 10)]
    assert count_tokens("   ") == 1 and count_tokens("Hello world.") == 3


def test_generation_is_deterministic_by_prompt_and_seed() -> None:
    greedy = generate("Tell me", seed=None, max_new_tokens=12)
    assert greedy == generate("Tell me", seed=None, max_new_tokens=12)
    assert greedy.seed is None and greedy.finish_reason == "length" and len(greedy.tokens) == 12
    assert greedy.text == "".join(t.text for t in greedy.tokens)
    assert generate("Other prompt", seed=None, max_new_tokens=12).text != greedy.text
    first = generate("Tell me", seed=1, max_new_tokens=12)
    assert first == generate("Tell me", seed=1, max_new_tokens=12)
    assert first.text != generate("Tell me", seed=2, max_new_tokens=12).text
    assert first.seed == 1


def test_generation_stops_on_eos_and_stop_sequence() -> None:
    eos = generate("x", seed=None, max_new_tokens=10, eos_after=3)
    assert len(eos.tokens) == 4 and eos.finish_reason == "eos_token"
    assert eos.tokens[-1].special and eos.tokens[-1].text == "</s>" and "</s>" not in eos.text
    assert generate("x", seed=None, max_new_tokens=3, eos_after=3).finish_reason == "length"
    word = generate("x", seed=None, max_new_tokens=5).tokens[2].text
    stopped = generate("x", seed=None, max_new_tokens=50, stop=[word])
    assert stopped.finish_reason == "stop_sequence" and stopped.text.endswith(word)


def test_utf8_split_holds_back_partial_characters() -> None:
    gen = generate("x", seed=None, max_new_tokens=40, utf8_split=True)
    empties = [t for t in gen.tokens if t.text == ""]
    assert empties, "some tokens should carry an incomplete character"
    assert "".join(t.text for t in gen.tokens) == gen.text
    assert any(not ch.isascii() for ch in gen.text)
    assert "\ufffd" not in gen.text


# --- axum decoding ----------------------------------------------------------------


def decode(body: bytes, content_type: str = "application/json") -> Any:
    return decode_body({"content-type": content_type}, body, GENERATE_REQUEST, 2_000_000)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"", 400, "Failed to parse the request body as JSON: EOF while parsing a value at line 1 column 0"),
        (
            b'{"inputs":"x"',
            400,
            "Failed to parse the request body as JSON: EOF while parsing an object at line 1 column 13",
        ),
        (b"{bad}", 400, "Failed to parse the request body as JSON: key must be a string at line 1 column 2"),
        (
            b'{"parameters":{}}',
            422,
            "Failed to deserialize the JSON body into the target type: missing field `inputs` at line 1 column 17",
        ),
        (
            b'{"inputs":"x","parameters":{"seed":-1}}',
            422,
            "Failed to deserialize the JSON body into the target type: parameters.seed: "
            "invalid value: integer `-1`, expected u64 at line 1 column 37",
        ),
        (
            b'{"inputs":"x","parameters":{"stop":"a"}}',
            422,
            "Failed to deserialize the JSON body into the target type: parameters.stop: "
            'invalid type: string "a", expected a sequence at line 1 column 38',
        ),
    ],
)
def test_axum_rejections(body: bytes, status: int, text: str) -> None:
    reply = decode(body)
    assert isinstance(reply, Reply)
    assert (reply.status, reply.body.decode()) == (status, text)
    assert reply.headers == (("content-type", "text/plain; charset=utf-8"),)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            b'{"inputs":"caf\xc3\xa9","parameters":{"seed":"x"}}',
            'parameters.seed: invalid type: string "x", expected u64',
        ),
        (b'{"inputs":"x","parameters":{"top_k":true}}', "parameters.top_k: invalid type: boolean `true`, expected i32"),
        (b'{"inputs":"x","parameters":{"max_new_tokens":4294967296}}', "integer `4294967296`, expected u32"),
        (b'{"inputs":"x","parameters":{"temperature":"hot"}}', 'invalid type: string "hot", expected f32'),
        (b'{"inputs":"x","parameters":{"details":null}}', "parameters.details: invalid type: null, expected a boolean"),
        (
            b'{"inputs":"x","parameters":{"stop":[1]}}',
            "parameters.stop[0]: invalid type: integer `1`, expected a string",
        ),
        (b'{"inputs":["x"]}', "inputs: invalid type: sequence, expected a string at line 1 column 10"),
    ],
)
def test_axum_type_errors_name_the_field(body: bytes, text: str) -> None:
    reply = decode(body)
    assert isinstance(reply, Reply) and reply.status == 422
    assert text in reply.body.decode()


def test_axum_content_type_and_size_come_first() -> None:
    reply = decode(b"not json", content_type="text/plain")
    assert isinstance(reply, Reply) and reply.status == 415
    assert reply.body == b"Expected request with `Content-Type: application/json`"
    assert decode(b'{"inputs":"x"}', content_type="application/vnd.api+json; charset=utf-8") == {"inputs": "x"}
    big = decode_body(JSON_HEADERS, b" " * 11, GENERATE_REQUEST, 10)
    assert isinstance(big, Reply) and big.status == 413
    assert big.body == b"Failed to buffer the request body: length limit exceeded"


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"temperature": 0, "top_p": 1.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0, "top_k": 0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0, "max_new_tokens": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 4095. Given: 0"),
        (
            {"max_new_tokens": 5000},
            "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 2 `inputs` tokens and 5000 `max_new_tokens`",
        ),
    ],
)
def test_validation_messages_in_order(params: dict[str, Any], message: str) -> None:
    parsed = Params.from_request({"inputs": "Hello world", "parameters": params}, Profile("3.1.0"))
    assert validate(Profile("3.1.0"), Limits(), parsed, "Hello world")[0] == message


def test_validation_empty_inputs_and_input_length() -> None:
    profile, limits = Profile("2.4.1"), Limits(max_total_tokens=50, max_input_tokens=10)
    assert validate(profile, limits, Params(), "")[0] == "`inputs` cannot be empty"
    long_prompt = " ".join(["word"] * 20)
    # Total tokens is checked before input length: the long prompt gets that message.
    assert validate(profile, limits, Params(max_new_tokens=40), long_prompt)[0] == (
        "`inputs` tokens + `max_new_tokens` must be <= 50. Given: 20 `inputs` tokens and 40 `max_new_tokens`"
    )
    assert validate(profile, limits, Params(max_new_tokens=2), long_prompt)[0] == (
        "`inputs` must have less than 10 tokens. Given: 20"
    )
    assert validate(profile, limits, Params(max_new_tokens=2, truncate=5), long_prompt) == (None, 5)


def test_max_new_tokens_chunking_since_3_1_1() -> None:
    limits = Limits(max_total_tokens=4096, max_input_tokens=4095)
    big = Params(max_new_tokens=10000)
    assert validate(Profile("3.1.0"), limits, big, "Hi")[0] is not None
    assert validate(Profile("3.1.1"), limits, big, "Hi")[0] is None
    assert planned_new_tokens(Profile("3.1.1"), limits, 1, 10000) == 3072
    assert planned_new_tokens(Profile("3.0.0"), limits, 1, None) == 4095
    assert planned_new_tokens(Profile("2.4.1"), limits, 1, 300) == 300


def test_parameters_absent_means_sampling_since_1_4() -> None:
    absent = Params.from_request({"inputs": "x"}, Profile("1.4.0"))
    assert absent.do_sample and absent.sampling
    assert not Params.from_request({"inputs": "x"}, Profile("1.3.4")).do_sample
    present = Params.from_request({"inputs": "x", "parameters": {}}, Profile("3.3.6"))
    assert not present.sampling
    assert Params(temperature=0.7).sampling and Params(top_k=5).sampling and not Params(temperature=1.0).sampling
    explicit_null = Params.from_request({"inputs": "x", "parameters": {"max_new_tokens": None}}, Profile("2.0.4"))
    assert explicit_null.max_new_tokens is None
    assert Params.from_request({"inputs": "x", "parameters": {}}, Profile("2.0.4")).max_new_tokens == 100


# --- rendering ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "prefix", "first_keys", "details_keys"),
    [
        ("0.9.4", b"data:{", ["token", "generated_text", "details"], ["finish_reason", "generated_tokens", "seed"]),
        (
            "2.0.4",
            b"data:{",
            ["index", "token", "generated_text", "details"],
            ["finish_reason", "generated_tokens", "seed"],
        ),
        (
            "3.3.6",
            b"data: {",
            ["index", "token", "generated_text", "details"],
            ["finish_reason", "generated_tokens", "seed", "input_length"],
        ),
    ],
)
def test_native_stream_frames_per_version(
    version: str, prefix: bytes, first_keys: list[str], details_keys: list[str]
) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3, "details": True}}
    stream = answer(routes(version), "/generate_stream", body)
    assert isinstance(stream, Stream) and stream.outcome == "success"
    assert [f.token for f in stream.frames] == [True, True, True]
    for frame in stream.frames:
        assert frame.data.startswith(prefix) and frame.data.endswith(b"}\n\n") and frame.data.count(b"\n") == 2
    frames = frames_json(stream)
    assert list(frames[0]) == first_keys and frames[0]["generated_text"] is None and frames[0]["details"] is None
    assert list(frames[0]["token"]) == ["id", "text", "logprob", "special"]
    last = frames[-1]
    assert list(last["details"]) == details_keys and last["details"]["seed"] is None
    assert last["generated_text"] == "".join(f["token"]["text"] for f in frames)
    if "index" in first_keys:
        assert [f["index"] for f in frames] == [1, 2, 3]


def test_generate_reply_details_and_seed() -> None:
    r = routes()
    reply = answer(r, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    assert isinstance(reply, Reply) and json.loads(reply.body).keys() == {"generated_text"}
    sampled = answer(r, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": True}})
    assert json.loads(sampled.body)["details"]["seed"] is None
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": True, "do_sample": True}}
    details = json.loads(answer(r, "/generate", body).body)["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    assert isinstance(details["seed"], int) and 0 <= details["seed"] < 2**64
    compat = answer(r, "/", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    [item] = json.loads(compat.body)
    assert item["generated_text"].startswith("Hello")  # return_full_text defaults to true on POST /


def test_info_fields_per_era() -> None:
    old = list(routes("2.0.4").info())
    assert old[:5] == ["model_id", "model_sha", "model_dtype", "model_device_type", "model_pipeline_tag"]
    assert "max_input_length" in old and "max_input_tokens" not in old and "max_batch_size" in old
    assert old[-6:] == ["validation_workers", "max_client_batch_size", "router", "version", "sha", "docker_label"]
    middle = routes("2.2.0").info()
    assert "max_input_tokens" in middle and "waiting_served_ratio" in middle
    assert list(routes("3.3.6").info()) == [
        "model_id",
        "model_sha",
        "model_pipeline_tag",
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
        "router",
        "version",
        "sha",
        "docker_label",
    ]
    assert "max_client_batch_size" not in routes("2.0.0").info() and "router" not in routes("2.0.2").info()


def test_chat_stream_usage_placement_by_version() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    late = frames_json(answer(routes("3.3.6"), "/v1/chat/completions", body))
    assert late[-1] == "[DONE]"
    assert late[-2]["choices"] == [] and late[-2]["usage"]["completion_tokens"] == 2
    assert all(chunk["usage"] is None for chunk in late[:-2])
    assert list(late[0]) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert late[0]["choices"][0]["delta"] == {"role": "assistant", "content": late[0]["choices"][0]["delta"]["content"]}
    mid = frames_json(answer(routes("3.1.0"), "/v1/chat/completions", body))
    assert len(mid) == 3 and mid[1]["usage"]["total_tokens"] == mid[1]["usage"]["prompt_tokens"] + 2
    old = frames_json(answer(routes("2.0.4"), "/v1/chat/completions", body))
    assert len(old) == 2 and "usage" not in old[0] and list(old[0])[:2] == ["id", "object"]
    assert old[0]["object"] == "text_completion"


def test_completions_stream_finish_reasons() -> None:
    body = {"prompt": ["a b", "c"], "max_tokens": 2, "stream": True, "model": "my-lora"}
    frames = frames_json(answer(routes("3.3.6"), "/v1/completions", body))
    assert frames[-1] == "[DONE]"
    choices = [f["choices"][0] for f in frames[:-1]]
    assert [c["index"] for c in choices] == [0, 1, 0, 1]
    assert [c["finish_reason"] for c in choices] == ["", "", "length", "length"]
    assert "usage" not in frames[0] and frames[2]["usage"]["completion_tokens"] == 2
    assert all(f["model"] == "my-lora" for f in frames[:-1])
    eos = frames_json(answer(routes("3.3.6", eos_after=1), "/v1/completions", {**body, "prompt": "x"}))
    assert eos[-2]["choices"][0]["finish_reason"] == "eos_token"
    reply = answer(routes("3.3.6", eos_after=1), "/v1/completions", {"prompt": "x", "max_tokens": 4})
    assert json.loads(reply.body)["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("2.0.4", [{"error": "Input validation error: `top_p` must be > 0.0 and < 1.0", "error_type": "validation"}]),
        (
            "2.2.0",
            [
                {"error": "Input validation error: `top_p` must be > 0.0 and < 1.0", "error_type": "validation"},
                "[DONE]",
            ],
        ),
        (
            "3.3.6",
            [
                {
                    "error": {
                        "message": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                        "http_status_code": 422,
                    }
                },
                "[DONE]",
            ],
        ),
    ],
)
def test_openai_stream_error_shape_by_version(version: str, expected: list[Any]) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "top_p": 1.0, "stream": True}
    assert frames_json(answer(routes(version), "/v1/chat/completions", body)) == expected


def test_overload_before_validation() -> None:
    r = routes()
    reply = answer(r, "/generate", {"inputs": "", "parameters": {"top_p": 7}}, overloaded=True)
    assert (reply.status, json.loads(reply.body)) == (429, {"error": "Model is overloaded", "error_type": "overloaded"})
    stream = answer(r, "/generate_stream", {"inputs": "x"}, overloaded=True)
    assert frames_json(stream) == [{"error": "Model is overloaded", "error_type": "overloaded"}]


def test_error_frame_malformed_and_oversized_faults() -> None:
    r = routes()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
    failed = answer(r, "/generate_stream", body, fault=Fault("error_frame", at_token=2, error_type="validation"))
    frames = frames_json(failed)
    assert len(frames) == 3 and frames[2]["error_type"] == "validation" and failed.outcome == "validation"
    malformed = answer(r, "/generate_stream", body, fault=Fault("malformed", at_token=1))
    assert malformed.frames[1].data == b'data: {"index":\n\n' and len(malformed.frames) == 5
    big = answer(r, "/generate_stream", body, fault=Fault("oversized", at_token=1, size=5000))
    assert len(big.frames[1].data) - 2 == 5000 and json.loads(big.frames[1].data[6:])["index"] == 2
    too_late = answer(r, "/generate_stream", body, fault=Fault("error_frame", at_token=4))
    assert len(too_late.frames) == 4 and too_late.outcome == "success"
    reply = answer(r, "/generate", body, fault=Fault("error_frame", error_type="overloaded"))
    assert reply.status == 429 and json.loads(reply.body)["error"] == "Model is overloaded"


def test_status_fault_replies() -> None:
    profile = Profile("3.3.6")
    overloaded = status_reply(profile, Fault("status", status=429, headers={"Retry-After": "1"}))
    assert json.loads(overloaded.body) == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert ("retry-after", "1") in overloaded.headers and ("content-type", "application/json") in overloaded.headers
    proxy = status_reply(profile, Fault("status", status=502))
    assert b"502 Bad Gateway" in proxy.body and ("content-type", "text/html") in proxy.headers
    custom = status_reply(profile, Fault("status", status=500, body="oops"))
    assert custom.body == b"oops" and ("content-type", "text/plain; charset=utf-8") in custom.headers
    assert status_reply(profile, Fault("status", status=401)).body == b""


def test_metrics_text_appears_once_recorded() -> None:
    limits = Limits()
    assert render_metrics(Profile("2.4.1"), limits, MetricsState()) == ""
    assert "tgi_batch_max_total_tokens" in render_metrics(Profile("3.0.0"), limits, MetricsState())
    state = MetricsState(requests=3, success=1, failures={"validation": 2}, durations=[0.01], generated=[5])
    state.queued, state.batch_size = True, 1
    text = render_metrics(Profile("3.3.6"), limits, state)
    lines = text.splitlines()
    assert "tgi_request_count 3" in lines and 'tgi_request_failure{err="validation"} 2' in lines
    assert "tgi_batch_current_size 1" in lines and "tgi_queue_size 0" in lines
    assert (
        'tgi_request_duration_bucket{le="0.00015"} 0' in lines and 'tgi_request_duration_bucket{le="+Inf"} 1' in lines
    )
    assert "tgi_request_duration_count 1" in lines and "# TYPE tgi_request_duration histogram" in lines
    assert not any(line.endswith("_total") for line in lines)
    assert (rust_float(0.0), rust_float(2.5), rust_float(1e-7), rust_float(3.0)) == ("0", "2.5", "0.0000001", "3")
