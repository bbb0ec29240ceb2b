"""Frame mappers: TGI's stream frames (three native eras, the OpenAI routes) to contract events."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_adapter.contract import EVENT_KINDS, FINISH_REASONS, U64_MAX, TokenEvent
from tgi_adapter.errors import ErrorKind
from tgi_adapter.frames import FrameMapper, NativeFrames, OpenAIFrames, mapper_for_route
from tgi_adapter.sse import SseDecoder

STARTED: Dict[str, Any] = {
    "engine": "tgi",
    "engine_version": "3.3.6+sha.1a2b3c4",
    "model_id": "meta-llama/Llama-3.1-8B-Instruct",
    "model_sha": "0e9e39f249a16976918f6564b8830bc894c89659",
    "task_id": "t-1",
    "seed": 42,
    "determinism": "best_effort",
    "sampler_profile_version": None,
}
T_SUBMIT = 100.0


def mapper(route: str = "native", *, sampled_seed: Optional[int] = None, secrets: Sequence[str] = ()) -> FrameMapper:
    return mapper_for_route(route, dict(STARTED), t_submit=T_SUBMIT, secrets=secrets, sampled_seed=sampled_seed)


def dumps(obj: Any) -> bytes:
    """Compact JSON with raw UTF-8, as serde_json writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def kinds(events: Sequence[TokenEvent]) -> List[str]:
    return [e.kind for e in events]


def token_texts(events: Sequence[TokenEvent]) -> List[str]:
    return [e.data["t"] for e in events if e.kind == "token"]


def check_invariants(events: Sequence[TokenEvent]) -> None:
    """DESIGN §2: started once and first, tokens counted from 0, never empty, metrics then one end last."""
    names = kinds(events)
    assert set(names) <= set(EVENT_KINDS)
    assert names.count("started") <= 1
    if "token" in names or "end" in names:
        assert names[0] == "started"
    tokens = [e for e in events if e.kind == "token"]
    assert [t.data["i"] for t in tokens] == list(range(len(tokens)))
    assert all(isinstance(t.data["t"], str) and t.data["t"] for t in tokens)
    assert names.count("end") <= 1
    if "end" in names:
        assert names[-2:] == ["metrics", "end"]
        assert events[-1].data["finish_reason"] in FINISH_REASONS
    assert "error" not in names  # a mapper reports failures through .error, not as events


# --------------------------------------------------------------------------
# Native frames, built as the three eras send them


def native_frame(
    era: str,
    n: int,
    text: str,
    *,
    special: bool = False,
    generated: Optional[str] = None,
    details: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    frame: Dict[str, Any] = {}
    if era != "0.9":
        frame["index"] = n + 1  # since 1.4, 1-based
    frame["token"] = {"id": 1000 + n, "text": text, "logprob": -0.25, "special": special}
    frame["generated_text"] = generated
    frame["details"] = details
    return frame


def native_stream(
    era: str,
    texts: Sequence[str],
    *,
    generated: Optional[str] = None,
    finish: str = "length",
    seed: Optional[int] = None,
    special_last: bool = False,
    with_details: bool = True,
    input_length: int = 7,
) -> List[bytes]:
    """The payloads of a whole /generate_stream body; the last token is the final frame."""
    payloads = []
    for n, text in enumerate(texts[:-1]):
        payloads.append(dumps(native_frame(era, n, text)))
    n = len(texts) - 1
    if generated is None:
        generated = "".join(texts[:-1]) + ("" if special_last else texts[-1])
    details: Optional[Dict[str, Any]] = None
    if with_details:
        details = {"finish_reason": finish, "generated_tokens": len(texts), "seed": seed}
        if era == "3":
            details["input_length"] = input_length
    payloads.append(dumps(native_frame(era, n, texts[-1], special=special_last, generated=generated, details=details)))
    return payloads


ERAS = ["0.9", "2.0", "3"]


@pytest.mark.parametrize("era", ERAS)
def test_native_stream_of_each_era(era: str) -> None:
    texts = ["Deep", " Learning", " is", " a", " sub", "field", "</s>"]
    m = mapper()
    payloads = native_stream(era, texts, finish="eos_token", special_last=True)
    events = m.feed(payloads[:3], 101.0)
    assert not m.done
    events += m.feed(payloads[3:], 103.5)
    check_invariants(events)
    assert kinds(events) == ["started"] + ["token"] * 6 + ["metrics", "end"]
    assert events[0].data == STARTED
    assert "".join(token_texts(events)) == "Deep Learning is a subfield"
    assert m.text == "Deep Learning is a subfield" and m.texts == token_texts(events)
    assert m.done and m.error is None and m.started_sent
    end = events[-1].data
    assert end == {
        "tokens_out": 7,
        "decode_ms": 2500,
        "finish_reason": "eos_token",
        "tokens_in": 7 if era == "3" else None,
        "seed": None,
        "engine_version": "3.3.6+sha.1a2b3c4",
    }
    assert events[-2].data == {"latency_first_token_ms": 1000, "latency_decode_ms": 2500, "tokens_out": 7}
    assert m.feed(native_stream(era, ["more"]), 104.0) == []  # nothing after the end
    assert m.at_eof(105.0) == [] and m.error is None


@pytest.mark.parametrize("era", ERAS)
def test_end_to_end_from_sse_bytes_in_any_chunking(era: str) -> None:
    texts = ["Pour", " dé", "", "guster", " 日本", "", "語", " \U0001f600", "."]
    space = b" " if era == "3" else b""
    body = b"".join(b"data:" + space + p + b"\n\n" + (b":\n\n" if i == 2 else b"") for i, p in enumerate(
        native_stream(era, texts, seed=18435558523380366744)
    ))
    reference = None
    for size in (len(body), 1, 2, 3, 5, 17, 64):
        decoder = SseDecoder()
        m = mapper()
        events: List[TokenEvent] = []
        for start in range(0, len(body), size):
            events += m.feed(decoder.feed(body[start : start + size]), 101.0)
        events += m.at_eof(102.0)
        check_invariants(events)
        assert m.error is None
        assert "".join(token_texts(events)) == "Pour déguster 日本語 \U0001f600."
        assert events[-1].data["seed"] == 18435558523380366744
        summary = [(e.kind, e.data.get("t"), e.data.get("i")) for e in events]
        if reference is None:
            reference = summary
        assert summary == reference, size


def test_started_comes_once_before_the_first_token() -> None:
    m = mapper()
    first = m.feed([dumps(native_frame("3", 0, ""))], 101.0)  # an incomplete character: nothing to show yet
    assert first == [] and not m.started_sent
    second = m.feed([dumps(native_frame("3", 1, "é"))], 101.5)
    assert kinds(second) == ["started", "token"]
    assert second[1].data == {"t": "é", "i": 0}
    third = m.feed([dumps(native_frame("3", 2, "!"))], 102.0)
    assert kinds(third) == ["token"] and third[0].data == {"t": "!", "i": 1}


def test_started_comes_before_the_end_when_there_is_no_token() -> None:
    # flan-t5: the only frame is a " " token while generated_text is "" (recorded, TGI 0.9 and 2.0)
    m = mapper()
    frame = {
        "token": {"id": 3, "text": " ", "logprob": -2.0078125, "special": False},
        "generated_text": "",
        "details": {"finish_reason": "length", "generated_tokens": 1, "seed": None},
    }
    events = m.feed([dumps(frame)], 101.0)
    check_invariants(events)
    assert kinds(events) == ["started", "metrics", "end"]
    assert m.text == "" == frame["generated_text"]
    assert events[-1].data["tokens_out"] == 1 and events[-1].data["finish_reason"] == "length"


def test_byte_fallback_token_arrives_with_the_next_token() -> None:
    texts = ["The", " caf", "", "é", " is", ""]
    payloads = native_stream("3", texts, generated="The café is")
    events = mapper().feed(payloads, 101.0)
    check_invariants(events)
    assert token_texts(events) == ["The", " caf", "é", " is"]


def test_held_back_characters_on_the_final_frame_are_emitted() -> None:
    # The last token's text was held back ("" because it ended inside a character); generated_text has it.
    payloads = native_stream("3", ["Hi", " "], generated="Hi \U0001f600")
    payloads[-1] = payloads[-1].replace(b'"text":" "', b'"text":""')
    events = mapper().feed(payloads, 101.0)
    check_invariants(events)
    assert "".join(token_texts(events)) == "Hi \U0001f600"


@pytest.mark.parametrize("special_text", ["</s>", "<|eot_id|>", "<|im_end|>"])
def test_special_tokens_are_not_emitted(special_text: str) -> None:
    m = mapper()
    payloads = [
        dumps(native_frame("3", 0, "A")),
        dumps(native_frame("3", 1, special_text, special=True)),  # a special token mid-stream
        dumps(native_frame("3", 2, "B")),
    ]
    payloads += native_stream("3", ["C", special_text], special_last=True, finish="eos_token")[1:]
    events = m.feed(payloads, 101.0)
    check_invariants(events)
    assert token_texts(events) == ["A", "B"]
    assert special_text not in m.text


def test_tokens_out_counts_frames_when_details_are_absent() -> None:
    texts = ["a", "", "b", "</s>"]
    payloads = native_stream("3", texts, special_last=True, with_details=False)
    events = mapper().feed(payloads, 101.0)
    end = events[-1].data
    assert end["tokens_out"] == 4  # every token frame, the empty and the special one included
    assert end["finish_reason"] == "eos_token"  # no details: a special last token means EOS
    assert end["tokens_in"] is None and end["seed"] is None
    events = mapper().feed(native_stream("3", ["a", "b"], with_details=False), 101.0)
    assert events[-1].data["finish_reason"] == "length"


def test_tokens_out_prefers_generated_tokens() -> None:
    payloads = native_stream("3", ["a", "b"])
    last = json.loads(payloads[-1])
    last["details"]["generated_tokens"] = 40  # e.g. frames a proxy merged
    events = mapper().feed([payloads[0], dumps(last)], 101.0)
    assert events[-1].data["tokens_out"] == 40


@pytest.mark.parametrize("finish", ["length", "eos_token", "stop_sequence"])
def test_finish_reason_from_details(finish: str) -> None:
    events = mapper().feed(native_stream("2.0", ["x", "y"], finish=finish), 101.0)
    assert events[-1].data["finish_reason"] == finish


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (None, None),
        (0, 0),
        (42, 42),
        (2835381823020158940, 2835381823020158940),
        (18435558523380366744, 18435558523380366744),  # > 2**63, as recorded
        (U64_MAX, U64_MAX),
        (U64_MAX + 1, None),
        (-1, None),
        (True, None),
        (1.5, None),
        ("42", None),
    ],
)
def test_seed_is_the_engines_u64(seed: Any, expected: Optional[int]) -> None:
    events = mapper().feed(native_stream("3", ["a"], seed=seed), 101.0)
    assert events[-1].data["seed"] == expected


@pytest.mark.parametrize(("input_length", "expected"), [(7, 7), (0, 0), (-1, None), ("7", None), (None, None)])
def test_tokens_in_from_input_length(input_length: Any, expected: Optional[int]) -> None:
    payloads = native_stream("3", ["a"])
    last = json.loads(payloads[-1])
    last["details"]["input_length"] = input_length
    events = mapper().feed([dumps(last)], 101.0)
    assert events[-1].data["tokens_in"] == expected


def test_timing_of_metrics_and_end() -> None:
    m = mapper()
    m.feed(native_stream("3", ["a", "b", "c"])[:1], 100.25)
    m.feed(native_stream("3", ["a", "b", "c"])[1:2], 100.5)
    events = m.feed(native_stream("3", ["a", "b", "c"])[2:], 101.75)
    assert events[-2].data == {"latency_first_token_ms": 250, "latency_decode_ms": 1500, "tokens_out": 3}
    assert events[-1].data["decode_ms"] == 1500


# --------------------------------------------------------------------------
# Native error frames

NATIVE_ERRORS = [
    ("Input validation error: `top_p` must be > 0.0 and < 1.0", "validation", ErrorKind.INVALID_PARAMS, False),
    (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 1512. "
        "Given: 2 `inputs` tokens and 10000 `max_new_tokens`",
        "validation",
        ErrorKind.POOL_UNAVAILABLE,
        False,
    ),
    ("Model is overloaded", "overloaded", ErrorKind.ADMISSION_REJECT, True),
    ("Request failed during generation: Server error: shard 0 died", "generation", ErrorKind.INTERNAL, False),
    (
        "Request failed during generation: Server error: CUDA out of memory. Tried to allocate 2.00 GiB",
        "generation",
        ErrorKind.POOL_UNAVAILABLE,
        False,
    ),
    ("Incomplete generation", "incomplete_generation", ErrorKind.WORKER_RESET, True),
    ("Incomplete generation stream", "incomplete_generation_stream", ErrorKind.WORKER_RESET, True),
    ("Template error: template not found", "template_error", ErrorKind.INVALID_PARAMS, False),
    ("Stream event serialization error", "stream_serialization_error", ErrorKind.INTERNAL, False),
    ("something new", "brand_new_type", ErrorKind.INTERNAL, False),
]


@pytest.mark.parametrize(("message", "error_type", "code", "retriable"), NATIVE_ERRORS)
@pytest.mark.parametrize("route", ["native", "openai-chat", "openai-completions"])
def test_error_frame_before_any_token(
    message: str, error_type: str, code: ErrorKind, retriable: bool, route: str
) -> None:
    # On the OpenAI routes TGI 2.2-2.4.0 sent this native shape too.
    m = mapper(route)
    events = m.feed([dumps({"error": message, "error_type": error_type})], 101.0)
    assert events == []
    assert m.error is not None and m.done and not m.started_sent
    assert m.error.code is code and m.error.retriable is retriable
    assert m.at_eof(102.0) == [] and m.error.code is code  # the end of the body changes nothing


def test_error_frame_after_tokens() -> None:
    m = mapper()
    events = m.feed(native_stream("3", ["a", "b", "c"])[:2], 101.0)
    events += m.feed([dumps({"error": "Request failed during generation: boom", "error_type": "generation"})], 102.0)
    check_invariants(events)
    assert kinds(events) == ["started", "token", "token"]
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL and m.done
    assert m.feed(native_stream("3", ["late"]), 103.0) == []


def test_error_frame_in_the_same_read_as_tokens() -> None:
    m = mapper()
    overloaded = dumps({"error": "Model is overloaded", "error_type": "overloaded"})
    payloads = native_stream("3", ["a", "b", "c"])[:2] + [overloaded]
    events = m.feed(payloads + native_stream("3", ["x"]), 101.0)
    assert token_texts(events) == ["a", "b"] and "end" not in kinds(events)
    assert m.error is not None and m.error.code is ErrorKind.ADMISSION_REJECT


def test_error_without_error_type() -> None:
    m = mapper()
    m.feed([b'{"error":"unhealthy"}'], 101.0)
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL


def test_error_frame_message_is_redacted() -> None:
    m = mapper(secrets=["sekrit-token-123"])
    m.feed([dumps({"error": "bad header Authorization: Bearer sekrit-token-123", "error_type": "validation"})], 101.0)
    assert m.error is not None
    for text in (str(m.error), repr(m.error), json.dumps(m.error.to_event().data)):
        assert "sekrit-token-123" not in text


@pytest.mark.parametrize("now", [100.0, 150.0])
def test_eof_before_the_final_frame_is_a_reset(now: float) -> None:
    m = mapper()
    events = m.feed(native_stream("3", ["a", "b"])[:1], 101.0)
    assert kinds(events) == ["started", "token"]
    assert m.at_eof(now) == []
    assert m.error is not None and m.error.code is ErrorKind.WORKER_RESET and m.error.retriable
    assert m.done


def test_eof_of_an_empty_body_is_a_reset() -> None:
    m = mapper()
    assert m.at_eof(101.0) == []
    assert m.error is not None and m.error.code is ErrorKind.WORKER_RESET and not m.started_sent


MALFORMED = [
    b"not json",
    b"",
    b"{",
    b"[1, 2]",
    b'[{"token":{"text":"a"}}]',
    b"42",
    b'"a string"',
    b"null",
    b"true",
    b"{}",
    b'{"index":1}',
    b'{"token":"a","generated_text":null}',
    b'{"token":["a"],"generated_text":null}',
    b'{"token":7,"generated_text":null}',
    b'{"token":{"id":1},"generated_text":null}',
    b'{"token":{"text":5},"generated_text":null}',
    b'{"token":{"text":null},"generated_text":null}',
    b'{"token":{"text":["a"]},"generated_text":null}',
    b'{"token":null,"generated_text":"x"}',
    b'{"token":{"text":"a"},"generated_text":7}',
    b'{"token":"a","generated_text":"a","details":null}',
    b"\xff\xfe garbage",
]


@pytest.mark.parametrize("payload", MALFORMED)
@pytest.mark.parametrize("before", [0, 2])
def test_malformed_frames_are_internal_errors(payload: bytes, before: int) -> None:
    m = mapper()
    good = native_stream("3", ["a", "b", "c"])[:before]
    events = m.feed(good + [payload], 101.0)
    check_invariants(events)
    assert len(token_texts(events)) == before
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL and not m.error.retriable
    assert m.done


def test_malformed_frame_in_a_later_read() -> None:
    m = mapper()
    m.feed(native_stream("3", ["a", "b"])[:1], 101.0)
    assert m.feed([b"{not json"], 101.5) == []
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL


def test_garbage_after_the_final_frame_does_not_give_two_terminal_events() -> None:
    m = mapper()
    events = m.feed(native_stream("3", ["a", "b"]) + [b"garbage"], 101.0)
    assert not ("end" in kinds(events) and m.error is not None)


def test_a_payload_that_is_not_one_json_value_is_refused_in_any_batch() -> None:
    bad = dumps(native_frame("3", 1, "b")) + b"," + dumps(native_frame("3", 2, "c"))
    alone = mapper()
    alone.feed([bad], 101.0)
    assert alone.error is not None  # refused when alone
    batched = mapper()
    batched.feed([dumps(native_frame("3", 0, "a")), bad], 101.0)
    assert batched.error is not None and batched.error.code is ErrorKind.INTERNAL


@pytest.mark.parametrize("route", ["native", "openai-chat"])
def test_deeply_nested_json_is_an_error_not_an_exception(route: str) -> None:
    m = mapper(route)
    m.feed([b"[" * 100_000 + b"]" * 100_000], 101.0)
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL


# --------------------------------------------------------------------------
# Property: nothing the engine sends makes a mapper raise

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
FRAME_KEYS = st.sampled_from(
    ["token", "text", "special", "generated_text", "details", "error", "error_type", "choices", "delta", "content",
     "finish_reason", "usage", "prompt_tokens", "completion_tokens", "seed", "input_length", "generated_tokens",
     "message", "http_status_code", "index"]
)
FRAMEISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**65) | st.text(max_size=5)
    | st.sampled_from(["</s>", "length", "eos_token", "stop", "overloaded", "validation", "", "[DONE]"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(FRAME_KEYS, children, max_size=5),
    max_leaves=15,
)
PAYLOAD = st.one_of(
    st.binary(max_size=40),
    JSON.map(dumps),
    FRAMEISH.map(dumps),
    st.just(b"[DONE]"),
    st.sampled_from(native_stream("3", ["a", "", "b", "</s>"], special_last=True)),
)


@settings(max_examples=100)
@given(
    route=st.sampled_from(["native", "openai-chat", "openai-completions"]),
    reads=st.lists(st.lists(PAYLOAD, max_size=4), max_size=5),
    eof=st.booleans(),
)
def test_arbitrary_payloads_never_raise(route: str, reads: List[List[bytes]], eof: bool) -> None:
    m = mapper(route)
    events: List[TokenEvent] = []
    for n, payloads in enumerate(reads):
        was_done = m.done
        out = m.feed(payloads, 101.0 + n)
        if was_done:
            assert out == []
        events += out
    if eof:
        events += m.at_eof(110.0)
        assert m.done
    check_invariants(events)
    assert m.texts == token_texts(events)
    if m.error is not None:
        assert m.done
    assert m.started_sent == ("started" in kinds(events))


# --------------------------------------------------------------------------
# OpenAI routes


def chat_chunk(content: Optional[str], finish: Optional[str] = None, *, usage: Any = None) -> bytes:
    return dumps(
        {
            "object": "chat.completion.chunk",
            "id": "",
            "created": 1737565427,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "system_fingerprint": "3.2.1-native",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
    )


def usage_chunk(prompt: int, completion: int) -> bytes:
    return dumps(
        {
            "object": "chat.completion.chunk",
            "id": "",
            "created": 1737565427,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "system_fingerprint": "3.2.1-native",
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
    )


def completion_chunk(text: str, finish: str = "", *, usage: Any = None) -> bytes:
    frame: Dict[str, Any] = {
        "object": "text_completion",
        "id": "",
        "created": 1741340006,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "system_fingerprint": "3.1.2-dev0-native",
    }
    if usage is not None:
        frame["usage"] = usage
    return dumps(frame)


@pytest.mark.parametrize(
    ("wire", "expected"), [("stop", "eos_token"), ("length", "length"), ("stop_sequence", "stop_sequence")]
)
def test_chat_stream_with_usage_chunk(wire: str, expected: str) -> None:
    m = mapper("openai-chat", sampled_seed=1234)
    assert isinstance(m, OpenAIFrames)
    events = m.feed([chat_chunk("Deep"), chat_chunk(" Learning")], 101.0)
    assert kinds(events) == ["started", "token", "token"]
    events += m.feed([chat_chunk("", wire), usage_chunk(39, 3)], 102.0)
    assert not m.done  # waits for [DONE]
    events += m.feed([b"[DONE]"], 102.5)
    check_invariants(events)
    assert token_texts(events) == ["Deep", " Learning"]
    assert events[-1].data == {
        "tokens_out": 3,
        "decode_ms": 1500,
        "finish_reason": expected,
        "tokens_in": 39,
        "seed": 1234,
        "engine_version": "3.3.6+sha.1a2b3c4",
    }
    assert m.done and m.error is None


def test_chat_stream_all_in_one_read() -> None:
    m = mapper("openai-chat")
    payloads = [chat_chunk("Here"), chat_chunk(" we"), chat_chunk(" \n\n"), chat_chunk("", "stop"), b"[DONE]"]
    events = m.feed(payloads, 101.0)
    check_invariants(events)
    assert token_texts(events) == ["Here", " we", " \n\n"]
    assert events[-1].data["finish_reason"] == "eos_token"
    assert events[-1].data["tokens_out"] == 4  # chunks, EOS included, when there is no usage
    assert events[-1].data["tokens_in"] is None and events[-1].data["seed"] is None


def test_chat_usage_on_the_final_token_chunk() -> None:
    # TGI 2.3-3.1 with include_usage: the usage rides on the last token chunk.
    m = mapper("openai-chat")
    events = m.feed([chat_chunk("OK"), chat_chunk("!", "length", usage={"prompt_tokens": 40, "completion_tokens": 2,
                                                                          "total_tokens": 42}), b"[DONE]"], 101.0)
    assert events[-1].data["tokens_in"] == 40 and events[-1].data["tokens_out"] == 2


def test_chat_tool_call_stream_without_content() -> None:
    chunk = json.loads(chat_chunk(None))
    chunk["choices"][0]["delta"] = {"role": "assistant", "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
    m = mapper("openai-chat")
    events = m.feed([dumps(chunk), dumps(chunk), b"[DONE]"], 101.0)
    check_invariants(events)
    assert kinds(events) == ["started", "metrics", "end"]
    assert m.error is None


@pytest.mark.parametrize(("wire", "expected"), [("eos_token", "eos_token"), ("length", "length")])
def test_completions_stream(wire: str, expected: str) -> None:
    m = mapper("openai-completions")
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    payloads = [completion_chunk(" A"), completion_chunk(" B"), completion_chunk("", wire, usage=usage), b"[DONE]"]
    events = m.feed(payloads, 101.0)
    check_invariants(events)
    assert token_texts(events) == [" A", " B"]
    assert events[-1].data["finish_reason"] == expected
    assert events[-1].data["tokens_in"] == 3 and events[-1].data["tokens_out"] == 3


def test_completions_eos_chunk_does_not_emit_the_eos_text() -> None:
    # The completions stream's last chunk on EOS carries the EOS token's own text.
    m = mapper("openai-completions")
    events = m.feed([completion_chunk(" A"), completion_chunk("</s>", "eos_token"), b"[DONE]"], 101.0)
    check_invariants(events)
    assert token_texts(events) == [" A"]
    assert events[-1].data["finish_reason"] == "eos_token"
    m = mapper("openai-completions")
    events = m.feed([completion_chunk(" A"), completion_chunk(" B", "length"), b"[DONE]"], 101.0)
    assert token_texts(events) == [" A", " B"]  # a length stop's last chunk is an ordinary token


def test_completions_intermediate_empty_finish_reason_is_not_an_end() -> None:
    m = mapper("openai-completions")
    m.feed([completion_chunk(" A", "")], 101.0)
    assert not m.done
    assert m.at_eof(102.0) == []
    assert m.error is not None and m.error.code is ErrorKind.WORKER_RESET


@pytest.mark.parametrize("route", ["openai-chat", "openai-completions"])
def test_stream_without_done_ends_at_eof_after_a_finish_reason(route: str) -> None:
    # TGI < 2.2 sent no [DONE].
    m = mapper(route)
    chunk = chat_chunk if route == "openai-chat" else completion_chunk
    events = m.feed([chunk("a"), chunk("b", "length")], 101.0)
    assert not m.done
    events += m.at_eof(102.0)
    check_invariants(events)
    assert m.error is None and m.done
    assert events[-1].data["finish_reason"] == "length"
    assert token_texts(events) == ["a", "b"]


def test_done_without_a_finish_reason_still_ends() -> None:
    m = mapper("openai-chat")
    events = m.feed([chat_chunk("a"), b"[DONE]"], 101.0)
    assert kinds(events) == ["started", "token", "metrics", "end"]


OPENAI_ERRORS = [
    ("Model is overloaded", ErrorKind.ADMISSION_REJECT, True),
    ("Input validation error: `top_p` must be > 0.0 and < 1.0", ErrorKind.INVALID_PARAMS, False),
    (
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
        "Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
        ErrorKind.POOL_UNAVAILABLE,
        False,
    ),
    ("Request failed during generation: Server error: CUDA out of memory", ErrorKind.POOL_UNAVAILABLE, False),
    ("Request failed during generation: Server error: boom", ErrorKind.INTERNAL, False),
    ("Incomplete generation stream", ErrorKind.WORKER_RESET, True),
    ("Tool error: Grammar and tools are mutually exclusive", ErrorKind.INVALID_PARAMS, False),
    ("Something else entirely", ErrorKind.INTERNAL, False),
]


@pytest.mark.parametrize(("message", "code", "retriable"), OPENAI_ERRORS)
@pytest.mark.parametrize("route", ["openai-chat", "openai-completions"])
def test_openai_in_stream_error(message: str, code: ErrorKind, retriable: bool, route: str) -> None:
    m = mapper(route)
    events = m.feed([dumps({"error": {"message": message, "http_status_code": 422}}), b"[DONE]"], 101.0)
    assert events == []
    assert m.error is not None and m.error.code is code and m.error.retriable is retriable
    assert m.done and not m.started_sent


def test_openai_error_after_tokens_gives_no_end() -> None:
    m = mapper("openai-chat")
    events = m.feed([chat_chunk("a")], 101.0)
    events += m.feed([dumps({"error": {"message": "Model is overloaded", "http_status_code": 422}}), b"[DONE]"], 102.0)
    check_invariants(events)
    assert kinds(events) == ["started", "token"]
    assert m.error is not None and m.error.code is ErrorKind.ADMISSION_REJECT


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"choices":[5]}',
        b'{"choices":"abc"}',
        b'{"choices":[{"delta":[1]}]}',
        b'{"choices":[{"delta":{"content":5}}]}',
        b'{"choices":[{"delta":{"content":"a"},"finish_reason":["stop"]}]}',
        b"[1]",
        b"7",
        b"nope",
    ],
)
def test_malformed_chat_chunks_are_internal_errors(payload: bytes) -> None:
    m = mapper("openai-chat")
    events = m.feed([chat_chunk("a"), payload, chat_chunk("b"), b"[DONE]"], 101.0)
    check_invariants(events)
    assert "end" not in kinds(events)
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL


@pytest.mark.parametrize(
    "payload", [b'{"choices":[{"text":5}]}', b'{"choices":[{"text":"a","finish_reason":{"a":1}}]}']
)
def test_malformed_completion_chunks_are_internal_errors(payload: bytes) -> None:
    m = mapper("openai-completions")
    m.feed([payload, b"[DONE]"], 101.0)
    assert m.error is not None and m.error.code is ErrorKind.INTERNAL


def test_mapper_for_route_picks_the_mapper() -> None:
    assert isinstance(mapper("native"), NativeFrames)
    chat = mapper("openai-chat")
    completions = mapper("openai-completions")
    assert isinstance(chat, OpenAIFrames) and isinstance(completions, OpenAIFrames)
    # the chat mapper reads delta.content, the completions mapper reads text
    assert token_texts(chat.feed([chat_chunk("x")], 101.0)) == ["x"]
    assert token_texts(completions.feed([completion_chunk("y")], 101.0)) == ["y"]
