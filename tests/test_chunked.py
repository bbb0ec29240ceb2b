"""The chunked transfer-coding decoder: any valid encoding, in any chunking, gives the payload back."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_adapter.chunked import ChunkedDecoder, ChunkedError


def split_at(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} - {0, len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def decode(chunks: Sequence[bytes]) -> Tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    return b"".join(decoder.feed(c) for c in chunks), decoder


def bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --------------------------------------------------------------------------
# Strategies: valid encodings as RFC 9112 §7.1 allows them

_PAYLOAD = st.one_of(
    st.binary(min_size=1, max_size=40),
    # data full of what the framing uses, so a CRLF inside the data is common
    st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"0", b"5", b"a", b";", b"data: {}\n\n"]), min_size=1).map(
        b"".join
    ),
)
_EXTENSION = st.sampled_from([b"", b"", b";a=b", b";name", b';q="x;y"', b" ;a=b", b";a=b;c=d"])
_TRAILERS = st.lists(st.sampled_from([b"X-Trailer: 1", b"Expires: never", b"a:b"]), max_size=3)


@st.composite
def size_line(draw: st.DrawFn, size: int) -> bytes:
    digits = format(size, "x")
    digits = draw(st.sampled_from([digits, digits.upper()]))
    zeros = b"0" * draw(st.integers(0, 3))
    return zeros + digits.encode("ascii") + draw(_EXTENSION) + b"\r\n"


@st.composite
def encodings(draw: st.DrawFn) -> Tuple[bytes, bytes]:
    """``(chunked body, payload)``: the payload cut into chunks of random sizes."""
    parts = draw(st.lists(_PAYLOAD, max_size=8))
    body = [draw(size_line(len(p))) + p + b"\r\n" for p in parts]
    body.append(b"0" * draw(st.integers(1, 2)) + draw(_EXTENSION) + b"\r\n")
    body.extend(t + b"\r\n" for t in draw(_TRAILERS))
    body.append(b"\r\n")
    return b"".join(body), b"".join(parts)


CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=16)


@settings(max_examples=120)
@given(case=encodings(), cuts=CUTS)
def test_any_encoding_in_any_chunking_gives_the_payload(case: Tuple[bytes, bytes], cuts: List[int]) -> None:
    body, payload = case
    chunks = split_at(body, cuts)
    decoder = ChunkedDecoder()
    out = b""
    for chunk in chunks:
        assert not decoder.done
        out += decoder.feed(chunk)
        assert decoder.pending == (not decoder.done)
    assert out == payload
    assert decoder.done and not decoder.pending


@st.composite
def tgi_reads(draw: st.DrawFn) -> Tuple[List[bytes], bytes]:
    """Reads as the reader sees them from TGI: one chunk per frame, reads mostly cut between chunks."""
    frames = draw(
        st.lists(
            st.one_of(
                st.binary(min_size=1, max_size=30).map(lambda b: b"data: " + b + b"\n\n"),
                st.just(b":\n\n"),
                _PAYLOAD,
            ),
            min_size=1,
            max_size=12,
        )
    )
    encoded = [draw(size_line(len(f))) if draw(st.booleans()) else b"%x\r\n" % len(f) for f in frames]
    pieces = [line + f + b"\r\n" for line, f in zip(encoded, frames)] + [b"0\r\n\r\n"]
    body = b"".join(pieces)
    boundaries = [sum(len(p) for p in pieces[:k]) for k in range(1, len(pieces))]
    cuts = draw(st.lists(st.sampled_from(boundaries) if boundaries else st.just(0), max_size=6))
    cuts += draw(st.lists(st.integers(0, len(body)), max_size=2))
    return split_at(body, cuts), b"".join(frames)


@settings(max_examples=100)
@given(case=tgi_reads())
def test_reads_cut_between_chunks_take_the_fast_path_and_agree(case: Tuple[List[bytes], bytes]) -> None:
    reads, payload = case
    out, decoder = decode(reads)
    assert out == payload and decoder.done
    slow, _ = decode(bytewise(b"".join(reads)))
    assert slow == payload


@settings(max_examples=100)
@given(case=encodings())
def test_whole_and_byte_at_a_time_agree(case: Tuple[bytes, bytes]) -> None:
    # One read takes the fast path where it can; single bytes always take the exact path.
    body, payload = case
    whole, a = decode([body])
    slow, b = decode(bytewise(body))
    assert whole == slow == payload
    assert a.done and b.done


@settings(max_examples=80)
@given(case=encodings(), cuts=CUTS)
def test_output_is_a_prefix_of_the_payload_at_every_step(case: Tuple[bytes, bytes], cuts: List[int]) -> None:
    body, payload = case
    decoder = ChunkedDecoder()
    out = b""
    for chunk in split_at(body, cuts)[:-1]:
        out += decoder.feed(chunk)
        assert payload.startswith(out)
        assert not decoder.done  # the final CRLF has not arrived yet


@settings(max_examples=60)
@given(case=encodings(), cuts=CUTS, extra=st.binary(min_size=1, max_size=8))
def test_bytes_after_the_last_chunk_raise(case: Tuple[bytes, bytes], cuts: List[int], extra: bytes) -> None:
    body, _ = case
    with pytest.raises(ChunkedError):
        decode(split_at(body + extra, cuts))
    decoder = ChunkedDecoder()
    decoder.feed(body)
    assert decoder.done
    assert decoder.feed(b"") == b""  # nothing is fine
    with pytest.raises(ChunkedError):
        decoder.feed(extra)


def test_typical_tgi_body() -> None:
    frames = [b'data: {"index":%d,"token":{"text":"t"}}\n\n' % i for i in range(300)] + [b":\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"
    out, decoder = decode([body])
    assert out == b"".join(frames) and decoder.done
    for size in (1, 2, 3, 7, 64, 1000, 65536):
        out, decoder = decode([body[i : i + size] for i in range(0, len(body), size)])
        assert out == b"".join(frames) and decoder.done, size


def test_one_big_chunk_passes_through_in_pieces() -> None:
    data = bytes(range(256)) * 400
    body = b"%X\r\n" % len(data) + data + b"\r\n0\r\n\r\n"
    decoder = ChunkedDecoder()
    out = [decoder.feed(body[:10])]
    for i in range(10, len(body), 4096):
        out.append(decoder.feed(body[i : i + 4096]))
    assert b"".join(out) == data and decoder.done


def test_not_done_until_the_final_crlf() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n0\r\n") == b"abc"
    assert not decoder.done and decoder.pending
    assert decoder.feed(b"X-T: 1\r\n") == b""
    assert not decoder.done
    assert decoder.feed(b"\r\n") == b""
    assert decoder.done and not decoder.pending


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # not hex
        b"\r\nab\r\n0\r\n\r\n",  # no size at all
        b"-2\r\nab\r\n0\r\n\r\n",  # negative
        b"+2\r\nab\r\n0\r\n\r\n",  # a sign is not a hex digit
        b"2_0\r\n" + b"a" * 32 + b"\r\n0\r\n\r\n",  # nor is an underscore
        b"2\r\nabc\r\n0\r\n\r\n",  # data longer than the size: no CRLF after it
        b"2\r\nabXY0\r\n\r\n",
        b"3\r\nab\r\n0\r\n\r\n",  # data shorter: the CRLF lands inside, and garbage follows
        b"2\r\nab\n0\r\n\r\n",  # a bare LF after the data
        b"5" * 5000,  # a size line that never ends
        b"1\r\na\r\n" + b"1" * 5000,
    ],
)
def test_malformed_framing_raises_whatever_the_chunking(body: bytes) -> None:
    with pytest.raises(ChunkedError):
        decode([body])
    with pytest.raises(ChunkedError):
        decode(bytewise(body))
    with pytest.raises(ChunkedError):
        decode([body[:2], body[2:]])


@pytest.mark.parametrize(
    "head",
    [b"+5", b"5_0", b"+0x5", b"0x5", b"0X5", b" 5", b"\t5", b"-5", b"\xd9\xa5", b"5" * 17],
)
def test_bad_size_lines_are_refused_by_both_paths(head: bytes) -> None:
    # int(x, 16) takes a sign, "_", "0x" and surrounding whitespace; a chunk-size is 1*HEXDIG and nothing else.
    size = 5
    body = head + b"\r\n" + b"a" * size + b"\r\n"  # one read of complete chunks: the fast path's shape
    with pytest.raises(ChunkedError):
        decode([body])
    with pytest.raises(ChunkedError):
        decode(bytewise(body + b"0\r\n\r\n"))  # the exact path
    with pytest.raises(ChunkedError):
        decode([b"3\r\nabc\r\n" + head + b"\r\naa"])  # the fast path with a chunk cut by the read


@pytest.mark.parametrize("head", [b"5 ", b"5\t", b"5 ;a=b", b"0000000000000005", b"5;a=b ", b"00005;x"])
def test_good_size_lines_with_padding_and_extensions(head: bytes) -> None:
    body = head + b"\r\nhello\r\n0\r\n\r\n"
    for chunks in ([body], bytewise(body)):
        out, decoder = decode(chunks)
        assert out == b"hello" and decoder.done


@pytest.mark.parametrize("line", [b"f" * 5000, b"1;" + b"e" * 5000])
def test_an_overlong_size_line_is_refused_whatever_the_chunking(line: bytes) -> None:
    body = line + b"\r\n" + b"a" + b"\r\n0\r\n\r\n"
    with pytest.raises(ChunkedError):
        decode(bytewise(body))  # the line passed 4096 bytes before its CRLF came
    with pytest.raises(ChunkedError):
        decode([body])  # and complete in one read it is no better


def test_error_message_quotes_the_bad_line() -> None:
    with pytest.raises(ChunkedError, match="bad chunk size line"):
        decode([b"xyz\r\n"])
    with pytest.raises(ChunkedError, match="not followed by CRLF"):
        decode([b"1\r\nab"])
    with pytest.raises(ChunkedError, match="after the last chunk"):
        decode([b"0\r\n\r\nX"])
