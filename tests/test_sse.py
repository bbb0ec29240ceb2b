"""The SSE decoder: any chunking of the same bytes yields the same events.

The oracle is a small, independent reading of the WHATWG event-stream rules
written below (``reference``); the decoder's fast path (reads made only of
``data:<json>\\n\\n`` frames) and its general line parser must both agree with it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_adapter.sse import FrameTooLarge, SseDecoder

BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------
# An independent reference: the WHATWG "interpreting an event stream" steps,
# applied to a complete byte string.


def reference_lines(stream: bytes) -> Tuple[List[bytes], bytes]:
    """Complete lines (CRLF, LF or CR ends) and the unterminated rest, BOM removed."""
    if stream.startswith(BOM):
        stream = stream[3:]
    lines: List[bytes] = []
    current = bytearray()
    i = 0
    n = len(stream)
    while i < n:
        byte = stream[i]
        if byte == 0x0D:
            lines.append(bytes(current))
            current = bytearray()
            if i + 1 < n and stream[i + 1] == 0x0A:
                i += 1
        elif byte == 0x0A:
            lines.append(bytes(current))
            current = bytearray()
        else:
            current.append(byte)
        i += 1
    return lines, bytes(current)


def reference(stream: bytes) -> Tuple[List[bytes], bool]:
    """``(data of every dispatched event, whether an unfinished event is buffered)``."""
    lines, rest = reference_lines(stream)
    events: List[bytes] = []
    data_buffer = b""
    for line in lines:
        if line == b"":
            if data_buffer:
                events.append(data_buffer[:-1])  # drop the trailing LF
            data_buffer = b""
            continue
        if line.startswith(b":"):
            continue
        if b":" in line:
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
        else:
            name, value = line, b""
        if name == b"data":
            data_buffer += value + b"\n"
        # event, id, retry and unknown fields do not change the data
    return events, bool(rest) or bool(data_buffer)


def reference_limits(stream: bytes) -> Tuple[int, int]:
    """``(longest line, largest event)`` where an event's size counts each data value plus one."""
    lines, rest = reference_lines(stream)
    longest = max([len(line) for line in lines] + [len(rest)])
    largest = 0
    size = 0
    for line in lines:
        if line == b"":
            size = 0
            continue
        name, colon, value = line.partition(b":")
        if name == b"data":
            if colon and value.startswith(b" "):
                value = value[1:]
            size += len(value) + 1
            largest = max(largest, size)
    return longest, largest


def feed_all(decoder: SseDecoder, chunks: Sequence[bytes]) -> List[bytes]:
    out: List[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def split_at(stream: bytes, cuts: Sequence[int]) -> List[bytes]:
    """``stream`` cut at ``cuts`` (sorted, deduplicated, no empty chunk)."""
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def bytewise(stream: bytes) -> List[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def test_reference_reads_the_specification_examples() -> None:
    # The examples of the WHATWG section "Event stream interpretation".
    assert reference(b"data: YHOO\ndata: +2\ndata: 10\n\n") == ([b"YHOO\n+2\n10"], False)
    assert reference(b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n") == (
        [b"first event", b"second event"],
        True,
    )
    assert reference(b"data\n\ndata\ndata\n\ndata:") == ([b"", b"\n"], True)
    assert reference(b"data:test\n\ndata: test\n\n") == ([b"test", b"test"], False)


# --------------------------------------------------------------------------
# Strategies


def _json_bytes(obj: Any, *, ascii_only: bool = False) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only).encode("utf-8")


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
_VALUE = st.one_of(
    _TEXT.map(lambda s: s.encode("utf-8")),
    st.binary(max_size=10).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b" ", b"  two spaces", b"[DONE]", b'{"token":{"text":"\xc3\xa9\xe6\x97\xa5"}}', b"a:b"]),
)
_NAME = st.sampled_from([b"data", b"event", b"id", b"retry", b"Data", b"x-field", b"data "])
_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def _line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "field", "field", "bare", "comment"]))
    if kind == "comment":
        return b":" + draw(_VALUE)
    name = draw(_NAME)
    if kind == "bare":
        return name
    return name + b":" + draw(st.sampled_from([b"", b" "])) + draw(_VALUE)


@st.composite
def general_streams(draw: st.DrawFn) -> bytes:
    """Any event stream: every field kind, comments, blank lines, mixed line ends, a BOM."""
    parts: List[bytes] = []
    if draw(st.booleans()):
        parts.append(BOM)
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 3)) == 0:
            parts.append(draw(_EOL))  # a blank line: dispatch
        else:
            parts.append(draw(_line()) + draw(_EOL))
    if draw(st.booleans()):
        parts.append(draw(_line()))  # an unterminated last line
    return b"".join(parts)


_TOKEN_TEXT = st.text(
    alphabet=st.sampled_from(list("ab :{}\"\\") + ["é", "日", "本", "\U0001f600", "\u00a0", "\n", "\r"]),
    max_size=6,
)


@st.composite
def tgi_streams(draw: st.DrawFn) -> bytes:
    """Streams shaped like TGI's: ``data:``/``data: `` + compact JSON + LF LF, keep-alives, raw UTF-8."""
    space = draw(st.sampled_from([b"", b" "]))
    frames: List[bytes] = []
    for n in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 5)) == 0:
            frames.append(b":\n\n")
        text = draw(_TOKEN_TEXT)
        frame = {"index": n + 1, "token": {"id": n, "text": text, "logprob": -0.5, "special": False}}
        frames.append(b"data:" + space + _json_bytes(frame) + b"\n\n")
    if draw(st.booleans()):
        frames.append(b"data:" + space + b'{"index":9,"tok')  # a frame cut by the read
    return b"".join(frames)


STREAMS = st.one_of(general_streams(), tgi_streams())
CUTS = st.lists(st.integers(min_value=0, max_value=4096), max_size=12)


# --------------------------------------------------------------------------
# Any chunking gives the reference's events


@settings(max_examples=250)
@given(stream=STREAMS, cuts=CUTS)
def test_any_chunking_matches_the_reference(stream: bytes, cuts: List[int]) -> None:
    expected, pending = reference(stream)
    whole = SseDecoder()
    assert whole.feed(stream) == expected
    assert whole.pending == pending
    chunked = SseDecoder()
    scaled = [c % (len(stream) + 1) for c in cuts]
    assert feed_all(chunked, split_at(stream, scaled)) == expected
    assert chunked.pending == pending


@settings(max_examples=100)
@given(stream=STREAMS)
def test_one_byte_at_a_time_matches_the_reference(stream: bytes) -> None:
    decoder = SseDecoder()
    assert feed_all(decoder, bytewise(stream)) == reference(stream)[0]
    assert decoder.pending == reference(stream)[1]


@st.composite
def intended_streams(draw: st.DrawFn) -> Tuple[bytes, List[bytes]]:
    """A stream written from known events, with one kind of line end, and those events."""
    eol = draw(_EOL)
    space = draw(st.sampled_from([b"", b" "]))
    out: List[bytes] = []
    events: List[bytes] = []
    if draw(st.booleans()):
        out.append(BOM)
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            out.append(b":" + draw(_VALUE) + eol)
        values = draw(st.lists(_TEXT.map(lambda s: s.encode("utf-8")), min_size=1, max_size=3))
        if draw(st.booleans()):
            out.append(b"event: message" + eol)
        for value in values:
            # as a writer must: a value that starts with a space needs the optional space first
            out.append(b"data:" + (b" " if value.startswith(b" ") else space) + value + eol)
        if draw(st.booleans()):
            out.append(b"id: 7" + eol + b"retry: 1500" + eol)
        out.append(eol)
        events.append(b"\n".join(values))
    return b"".join(out), events


@settings(max_examples=120)
@given(case=intended_streams(), cuts=CUTS)
def test_known_events_come_back_whatever_the_chunking(case: Tuple[bytes, List[bytes]], cuts: List[int]) -> None:
    stream, events = case
    assert reference(stream)[0] == events  # the oracle itself reads them right
    scaled = [c % (len(stream) + 1) for c in cuts]
    assert feed_all(SseDecoder(), split_at(stream, scaled)) == events
    assert feed_all(SseDecoder(), bytewise(stream)) == events


# --------------------------------------------------------------------------
# Streams modelled on the recordings of the three TGI eras


def _frame_0_9(n: int, text: str, last: bool, generated: str) -> Dict[str, Any]:
    # 2023, TGI <= 0.9: no index; data: without a space.
    return {
        "token": {"id": 100 + n, "text": text, "logprob": -2.0078125, "special": False},
        "generated_text": generated if last else None,
        "details": {"finish_reason": "length", "generated_tokens": n + 1, "seed": None} if last else None,
    }


def _frame_2_0(n: int, text: str, last: bool, generated: str) -> Dict[str, Any]:
    # 2024, TGI 2.0.x: index added; still no space.
    return {"index": n + 1, **_frame_0_9(n, text, last, generated)}


def _frame_3(n: int, text: str, last: bool, generated: str) -> Dict[str, Any]:
    # 2025, TGI 3.x: a space after data:, input_length in details.
    frame = _frame_2_0(n, text, last, generated)
    if last:
        frame["details"]["input_length"] = 7
    return frame


ERAS = {
    "0.9": (_frame_0_9, b"data:"),
    "2.0": (_frame_2_0, b"data:"),
    "3": (_frame_3, b"data: "),
}
TEXTS = ["Deep", " Learning", " est", " é", "", "t\u00e9", " 日本", " \U0001f600", " \\\"q\"", "."]


def era_stream(era: str, *, keepalive_at: Optional[int] = 2) -> Tuple[bytes, List[Dict[str, Any]]]:
    build, prefix = ERAS[era]
    frames = []
    body = []
    generated = ""
    for n, text in enumerate(TEXTS):
        last = n == len(TEXTS) - 1
        generated += text
        frame = build(n, text, last, generated)
        frames.append(frame)
        if n == keepalive_at:
            body.append(b":\n\n")
        body.append(prefix + _json_bytes(frame) + b"\n\n")
    return b"".join(body), frames


@pytest.mark.parametrize("era", sorted(ERAS))
def test_era_stream_decodes_to_its_frames(era: str) -> None:
    stream, frames = era_stream(era)
    assert b"\xc3\xa9" in stream  # raw UTF-8, as serde_json writes it
    payloads = SseDecoder().feed(stream)
    assert [json.loads(p) for p in payloads] == frames
    assert payloads == reference(stream)[0]


@pytest.mark.parametrize("era", sorted(ERAS))
def test_era_stream_every_single_cut_and_every_byte(era: str) -> None:
    stream, _ = era_stream(era)
    expected = SseDecoder().feed(stream)
    for cut in range(len(stream) + 1):
        decoder = SseDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == expected, cut
        assert not decoder.pending
    decoder = SseDecoder()
    assert feed_all(decoder, bytewise(stream)) == expected
    assert not decoder.pending


@pytest.mark.parametrize(
    "stream",
    [
        # the recorded bodies' shapes, one per era
        b'data:{"token":{"id":3,"text":" ","logprob":-2.0078125,"special":false},"generated_text":"",'
        b'"details":{"finish_reason":"length","generated_tokens":1,"seed":null}}\n\n',
        b'data:{"index":1,"token":{"id":3,"text":" ","logprob":-2.0078125,"special":false},"generated_text":"",'
        b'"details":{"finish_reason":"length","generated_tokens":1,"seed":null}}\n\n',
        b'data: {"index":1,"token":{"id":13,"text":".","logprob":-2.877385,"special":false},"generated_text":".",'
        b'"details":{"finish_reason":"length","generated_tokens":1,"seed":null,"input_length":1}}\n\n',
    ],
    ids=["0.9", "2.0", "3.x"],
)
def test_single_final_frame_of_each_era(stream: bytes) -> None:
    (payload,) = SseDecoder().feed(stream)
    assert payload.startswith(b"{") and payload.endswith(b"}}")
    assert json.loads(payload)["details"]["finish_reason"] == "length"


def test_openai_stream_keeps_done_marker() -> None:
    chunk = (
        b'{"object":"chat.completion.chunk",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":" \\n\\n"}}]}'
    )
    stream = b"data: " + chunk + b"\n\n:\n\ndata: [DONE]\n\n"
    assert SseDecoder().feed(stream) == [chunk, b"[DONE]"]


def test_keepalives_only_produce_nothing() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b":\n\n" * 50) == []
    assert not decoder.pending


@pytest.mark.parametrize(
    ("stream", "events"),
    [
        (b"data:a\n\n", [b"a"]),
        (b"data: a\n\n", [b"a"]),
        (b"data:  a\n\n", [b" a"]),  # exactly one space is removed
        (b"data:\n\n", [b""]),  # an empty data line is an event with empty data
        (b"data\n\n", [b""]),  # a field without a colon has an empty value
        (b"event: x\n\n", []),  # no data line: nothing is dispatched
        (b"id: 1\nretry: 5\n\n", []),
        (b"data:a\ndata:b\n\n", [b"a\nb"]),
        (b"data:a\r\ndata:b\r\n\r\n", [b"a\nb"]),
        (b"data:a\rdata:b\r\r", [b"a\nb"]),
        (b"data:a\r\n\ndata:b\n\r\n", [b"a", b"b"]),
        (b"Data:a\n\n", []),  # field names are case-sensitive
        (BOM + b"data:a\n\n", [b"a"]),
        (BOM + BOM + b"data:a\n\n", []),  # only one BOM is removed; the second is part of the name
        (b"data:a\n\ndata:b", [b"a"]),  # the last event is unfinished
        (b"data:a\n", []),
        (b":comment\ndata:x\n\n", [b"x"]),
        (b"data:a\n\n:\n\ndata:b\n\n", [b"a", b"b"]),
    ],
)
def test_decoder_cases(stream: bytes, events: List[bytes]) -> None:
    assert reference(stream)[0] == events
    assert SseDecoder().feed(stream) == events
    assert feed_all(SseDecoder(), bytewise(stream)) == events


def test_bom_split_across_reads() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.pending
    assert decoder.feed(b"\xbb") == []
    assert decoder.feed(b"\xbfdata:a\n\n") == [b"a"]
    assert not decoder.pending


def test_bytes_that_only_look_like_a_bom_start_are_kept() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbbX:1\ndata:z\n\n") == [b"z"]


def test_crlf_split_between_reads_is_one_line_end() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data:a\r") == []
    assert decoder.feed(b"\n") == []  # the LF completes the CR, it is not a blank line
    assert decoder.feed(b"\r\n") == [b"a"]


def test_non_ascii_split_inside_a_character() -> None:
    stream = "data: {\"t\":\"日本語 é\"}\n\n".encode()
    for cut in range(len(stream)):
        decoder = SseDecoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert out == ['{"t":"日本語 é"}'.encode()]


def test_pending_tracks_unfinished_events() -> None:
    decoder = SseDecoder()
    assert not decoder.pending
    decoder.feed(b"data:a")
    assert decoder.pending
    decoder.feed(b"\n")
    assert decoder.pending  # a data line waits for its blank line
    assert decoder.feed(b"\n") == [b"a"]
    assert not decoder.pending


def test_empty_read_between_cr_and_lf_changes_nothing() -> None:
    decoder = SseDecoder()
    out = decoder.feed(b"data:a\r")
    out += decoder.feed(b"")
    out += decoder.feed(b"\ndata:b\r\n\r\n")
    assert out == [b"a\nb"]


@settings(max_examples=60)
@given(stream=STREAMS, empties=st.lists(st.integers(min_value=0, max_value=4096), max_size=4))
def test_empty_reads_anywhere_change_nothing(stream: bytes, empties: List[int]) -> None:
    chunks = bytewise(stream)
    for position in sorted((e % (len(chunks) + 1) for e in empties), reverse=True):
        chunks.insert(position, b"")
    assert feed_all(SseDecoder(), chunks) == reference(stream)[0]


# --------------------------------------------------------------------------
# max_frame_bytes


@settings(max_examples=120)
@given(stream=STREAMS, cuts=CUTS)
def test_streams_within_the_limit_never_raise(stream: bytes, cuts: List[int]) -> None:
    longest, largest = reference_limits(stream)
    limit = max(longest, largest, 1)
    scaled = [c % (len(stream) + 1) for c in cuts]
    expected = reference(stream)[0]
    assert SseDecoder(limit).feed(stream) == expected
    assert feed_all(SseDecoder(limit), split_at(stream, scaled)) == expected
    assert feed_all(SseDecoder(limit), bytewise(stream)) == expected


@settings(max_examples=100)
@given(
    before=tgi_streams(),
    space=st.sampled_from([b"", b" "]),
    excess=st.integers(min_value=1, max_value=300),
    eol=st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n"]),
    cuts=CUTS,
    limit=st.integers(min_value=128, max_value=400),
)
def test_a_data_value_over_the_limit_raises_whatever_the_chunking(
    before: bytes, space: bytes, excess: int, eol: bytes, cuts: List[int], limit: int
) -> None:
    if before and not before.endswith(b"\n\n"):
        before += b"\n\n"  # finish the cut frame so the big line starts a line
    big = b"data:" + space + b"x" * (limit + excess) + eol
    stream = before + big + b"data: after\n\n"
    scaled = [c % (len(stream) + 1) for c in cuts]
    for chunks in ([stream], split_at(stream, scaled), bytewise(stream)):
        decoder = SseDecoder(limit)
        with pytest.raises(FrameTooLarge) as info:
            for chunk in chunks:
                for payload in decoder.feed(chunk):
                    assert len(payload) <= limit  # nothing over the limit is ever handed out
        assert info.value.limit == limit


@settings(max_examples=100)
@given(
    before=tgi_streams(),
    space=st.sampled_from([b"", b" "]),
    excess=st.integers(min_value=1, max_value=300),
    complete=st.booleans(),
    cuts=CUTS,
)
def test_events_before_an_oversized_one_are_all_handed_out(
    before: bytes, space: bytes, excess: int, complete: bool, cuts: List[int]
) -> None:
    # What feed() returned plus what FrameTooLarge carries is every event before the oversized line.
    limit = 400
    if before and not before.endswith(b"\n\n"):
        before += b"\n\n"
    big = b"data:" + space + b"x" * (limit + excess) + (b"\n\ndata: after\n\n" if complete else b"")
    expected = reference(before)[0]
    stream = before + big
    scaled = [c % (len(stream) + 1) for c in cuts]
    for chunks in ([stream], split_at(stream, scaled), bytewise(stream)):
        decoder = SseDecoder(limit)
        handed: List[bytes] = []
        with pytest.raises(FrameTooLarge) as info:
            for chunk in chunks:
                handed += decoder.feed(chunk)
        assert handed + info.value.payloads == expected


@settings(max_examples=100)
@given(lines=st.integers(min_value=2, max_value=40), value=st.binary(min_size=1, max_size=9), cuts=CUTS)
def test_a_multi_line_event_over_the_limit_raises(lines: int, value: bytes, cuts: List[int]) -> None:
    value = value.replace(b"\r", b"").replace(b"\n", b"") or b"v"
    stream = b"".join(b"data: " + value + b"\n" for _ in range(lines)) + b"\n"
    limit = lines * (len(value) + 1) - 1  # one byte short of the joined event
    scaled = [c % (len(stream) + 1) for c in cuts]
    for chunks in ([stream], split_at(stream, scaled)):
        with pytest.raises(FrameTooLarge):
            feed_all(SseDecoder(limit), chunks)
    roomy = max(limit + 1, len(b"data: ") + len(value))
    assert feed_all(SseDecoder(roomy), [stream]) == [b"\n".join([value] * lines)]


@pytest.mark.parametrize("piece", [1, 7, 100, 4096])
@pytest.mark.parametrize("prefix", [b"data:", b"data: ", b":", b"event: ", b"x"])
def test_an_endless_line_is_refused_once_it_passes_the_limit(piece: int, prefix: bytes) -> None:
    limit = 1000
    decoder = SseDecoder(limit)
    fed = 0

    def endless() -> Iterator[bytes]:
        yield prefix
        while True:
            yield b"y" * piece

    with pytest.raises(FrameTooLarge):
        for chunk in endless():
            decoder.feed(chunk)
            fed += len(chunk)
            assert fed <= limit, "the decoder kept buffering past its limit"


def test_an_endless_event_is_refused_once_it_passes_the_limit() -> None:
    limit = 1000
    decoder = SseDecoder(limit)
    lines = 0
    with pytest.raises(FrameTooLarge):
        while True:
            decoder.feed(b"data:abc\n")
            lines += 1
            assert lines * len(b"abc\n") <= limit, "the decoder kept an event larger than its limit"
    assert lines == limit // len(b"abc\n")


def test_many_small_events_never_hit_the_limit() -> None:
    decoder = SseDecoder(64)
    frame = b'data:{"index":1,"token":{"text":"a"}}\n\n:\n\n'
    total = 0
    for _ in range(2000):
        total += len(decoder.feed(frame))
    assert total == 2000


@pytest.mark.parametrize("space", [b"", b" "])
def test_a_line_of_exactly_the_limit_is_accepted(space: bytes) -> None:
    limit = 64
    line = b"data:" + space + b"z" * (limit - 5 - len(space))
    assert len(line) == limit
    stream = line + b"\n\n"
    expected = [b"z" * (limit - 5 - len(space))]
    assert SseDecoder(limit).feed(stream) == expected
    assert feed_all(SseDecoder(limit), bytewise(stream)) == expected


@pytest.mark.parametrize("over", [1, 3, 5])
def test_fast_path_refuses_a_data_line_just_over_the_limit(over: int) -> None:
    limit = 64
    stream = b"data: " + b"z" * (limit - 6 + over) + b"\n\n"  # the line is limit + over bytes
    with pytest.raises(FrameTooLarge):
        feed_all(SseDecoder(limit), bytewise(stream))  # the general path refuses it...
    with pytest.raises(FrameTooLarge):
        SseDecoder(limit).feed(stream)  # ...and so must the fast path


@pytest.mark.parametrize("prefix", [b":", b"event: ", b"id: "])
def test_any_complete_line_over_the_limit_raises_in_one_read(prefix: bytes) -> None:
    limit = 64
    stream = prefix + b"k" * (limit + 10) + b"\ndata:a\n\n"
    with pytest.raises(FrameTooLarge):
        feed_all(SseDecoder(limit), bytewise(stream))
    with pytest.raises(FrameTooLarge):
        SseDecoder(limit).feed(stream)
